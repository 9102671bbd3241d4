//! Tiny Shakespeare: the 1.1 MB selection of Shakespeare's plays that Karpathy's char-rnn
//! (2015) made the standard small corpus for character-level language models. The text is
//! public domain; the gzip file (434 KB) is embedded in the crate, so it needs no download.
//!
//! The split follows nanoGPT's `shakespeare_char/prepare.py`: the first `int(n * 0.9)`
//! characters are the training text, the rest the validation text.

use aigc_tensor::{Error, Result};
use std::io::Read;
use std::path::Path;

/// The embedded `input.txt.gz` (see `data/tinyshakespeare/SOURCE.md` at the repository root).
const SHAKESPEARE_GZ: &[u8] = include_bytes!("../../../data/tinyshakespeare/input.txt.gz");

/// The share of the characters that [`TinyShakespeare::train_val`] gives to training.
pub const TRAIN_FRACTION: f64 = 0.9;

/// The whole corpus as one string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyShakespeare {
    pub text: String,
}

impl TinyShakespeare {
    /// The embedded corpus (1,115,394 characters).
    pub fn load() -> Result<TinyShakespeare> {
        let text = parse(SHAKESPEARE_GZ, "embedded input.txt.gz")?;
        Ok(TinyShakespeare { text })
    }

    /// A corpus read from `path`: a UTF-8 text file, plain or gzip'd (recognised by the
    /// gzip magic bytes, not by the file name).
    pub fn load_from(path: impl AsRef<Path>) -> Result<TinyShakespeare> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|e| Error::Io { path: path.display().to_string(), reason: e.to_string() })?;
        let text = parse(&bytes, &path.display().to_string())?;
        Ok(TinyShakespeare { text })
    }

    /// Number of characters (not bytes).
    pub fn len(&self) -> usize {
        self.text.chars().count()
    }

    /// Whether the corpus has no characters.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// nanoGPT's split: the first 90% of the characters to train on, the last 10% to validate.
    pub fn train_val(&self) -> (&str, &str) {
        split_chars(&self.text, TRAIN_FRACTION)
    }
}

/// Splits `text` after its first `int(n * fraction)` characters (`n` = character count),
/// the expression nanoGPT uses; `fraction` is clamped to `[0, 1]`.
pub fn split_chars(text: &str, fraction: f64) -> (&str, &str) {
    let n = text.chars().count();
    let n_first = ((n as f64 * fraction.clamp(0.0, 1.0)) as usize).min(n);
    let at = text.char_indices().nth(n_first).map_or(text.len(), |(byte, _)| byte);
    text.split_at(at)
}

/// Decodes the bytes of a corpus file: gunzips them if they start with the gzip magic
/// bytes, then checks that the text is UTF-8 and not empty.
pub fn parse(bytes: &[u8], what: &str) -> Result<String> {
    let format = |reason: String| Error::Format { what: what.to_string(), reason };
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| format(format!("a corrupt gzip stream: {e}")))?;
        out
    } else {
        bytes.to_vec()
    };
    let text = String::from_utf8(raw).map_err(|e| {
        format(format!("not UTF-8 text: invalid byte sequence at byte {}", e.utf8_error().valid_up_to()))
    })?;
    if text.is_empty() {
        return Err(format("the corpus is empty".to_string()));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_corpus_matches_the_published_file_and_nanogpt_split() {
        let corpus = TinyShakespeare::load().unwrap();
        assert_eq!(corpus.len(), 1_115_394);
        assert!(corpus.text.starts_with("First Citizen:\n"));
        assert_eq!(corpus.text.lines().count(), 40_000);
        let mut chars: Vec<char> = corpus.text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        assert_eq!(chars.len(), 65);
        let (train, val) = corpus.train_val();
        assert_eq!((train.chars().count(), val.chars().count()), (1_003_854, 111_540));
        assert_eq!(format!("{train}{val}"), corpus.text);
    }

    #[test]
    fn split_counts_characters_not_bytes() {
        // 10 characters, 12 bytes: the split falls after 9 characters, on a code point boundary.
        assert_eq!(split_chars("héllo wörđ", 0.9), ("héllo wör", "đ"));
        assert_eq!(split_chars("abc", 1.0), ("abc", ""));
        assert_eq!(split_chars("abc", 0.0), ("", "abc"));
        assert_eq!(split_chars("", 0.9), ("", ""));
    }

    #[test]
    fn load_from_reads_plain_and_gzip_files_and_reports_bad_ones() {
        let dir = std::env::temp_dir().join(format!("aigc-shakespeare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("plain.txt");
        std::fs::write(&plain, "To be, or not to be\n").unwrap();
        assert_eq!(TinyShakespeare::load_from(&plain).unwrap().text, "To be, or not to be\n");

        let gz = dir.join("text.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, "that is the question".as_bytes()).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        assert_eq!(TinyShakespeare::load_from(&gz).unwrap().text, "that is the question");

        let missing = dir.join("missing.txt");
        assert!(matches!(TinyShakespeare::load_from(&missing), Err(Error::Io { .. })));
        let err = parse(&[b'a', 0xff, b'b'], "x").unwrap_err().to_string();
        assert_eq!(err, "x: not UTF-8 text: invalid byte sequence at byte 1");
        assert_eq!(parse(b"", "x").unwrap_err().to_string(), "x: the corpus is empty");
        let err = parse(&[0x1f, 0x8b, 0, 0], "x").unwrap_err().to_string();
        assert!(err.starts_with("x: a corrupt gzip stream"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
