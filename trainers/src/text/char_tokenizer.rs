//! The character-level tokenizer of char-rnn and nanoGPT's `shakespeare_char`: the vocabulary
//! is the sorted set of distinct characters of a corpus, and a character's id is its rank in
//! that set (`stoi = {ch: i for i, ch in enumerate(sorted(set(data)))}` in `prepare.py`).
//!
//! Saved as a small text file: a header line, then one code point per line in id order
//! (`000A` for the newline, `0020` for the space), so that whitespace stays visible.

use super::Tokenizer;
use aigc_tensor::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// First line of a saved [`CharTokenizer`].
const HEADER: &str = "# aigc char tokenizer v1: one Unicode code point (hex) per line, in id order";

/// One id per distinct character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharTokenizer {
    /// `chars[id]` is the character of `id`.
    chars: Vec<char>,
    /// The inverse of `chars`.
    ids: HashMap<char, u32>,
}

impl CharTokenizer {
    /// The sorted distinct characters of `corpus`.
    pub fn from_corpus(corpus: &str) -> Result<CharTokenizer> {
        let mut chars: Vec<char> = corpus.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        if chars.is_empty() {
            return Err(Error::invalid(
                "CharTokenizer::from_corpus",
                "the corpus is empty, so the vocabulary would be",
            ));
        }
        Ok(Self::from_distinct(chars))
    }

    /// A vocabulary in the given order (ids 0, 1, ...); every character must be distinct.
    pub fn from_chars(chars: Vec<char>) -> Result<CharTokenizer> {
        if chars.is_empty() {
            return Err(Error::invalid("CharTokenizer::from_chars", "the vocabulary is empty"));
        }
        let mut seen = HashMap::new();
        for (id, &c) in chars.iter().enumerate() {
            if let Some(first) = seen.insert(c, id) {
                return Err(Error::invalid(
                    "CharTokenizer::from_chars",
                    format!("{c:?} is listed twice (ids {first} and {id})"),
                ));
            }
        }
        Ok(Self::from_distinct(chars))
    }

    fn from_distinct(chars: Vec<char>) -> CharTokenizer {
        let ids = chars.iter().enumerate().map(|(id, &c)| (c, id as u32)).collect();
        CharTokenizer { chars, ids }
    }

    /// Number of distinct characters.
    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    /// The characters in id order.
    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// The id of each character; a character outside the vocabulary is an error that names
    /// it and its position.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .enumerate()
            .map(|(i, c)| {
                self.ids.get(&c).copied().ok_or_else(|| {
                    Error::invalid(
                        "CharTokenizer::encode",
                        format!("character {c:?} (U+{:04X}) at position {i} is not in the vocabulary", c as u32),
                    )
                })
            })
            .collect()
    }

    /// The characters of `ids`; an id at or above the vocabulary size is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        ids.iter()
            .map(|&id| {
                self.chars.get(id as usize).copied().ok_or_else(|| {
                    Error::invalid(
                        "CharTokenizer::decode",
                        format!("id {id} is out of range for a vocabulary of {}", self.chars.len()),
                    )
                })
            })
            .collect()
    }

    /// The saved form: the header, then one hex code point per line.
    pub fn to_text(&self) -> String {
        let mut out = format!("{HEADER}\n");
        for &c in &self.chars {
            out.push_str(&format!("{:04X}\n", c as u32));
        }
        out
    }

    /// Parses [`to_text`](Self::to_text)'s format; `what` names the source in errors.
    pub fn from_text(text: &str, what: &str) -> Result<CharTokenizer> {
        let format = |reason: String| Error::Format { what: what.to_string(), reason };
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(format(format!("the first line is not the header `{HEADER}`")));
        }
        let mut chars = Vec::new();
        for (i, line) in lines.enumerate() {
            let line_no = i + 2;
            let c = u32::from_str_radix(line, 16)
                .ok()
                .filter(|_| !line.is_empty() && line.len() <= 6)
                .and_then(char::from_u32)
                .ok_or_else(|| format(format!("line {line_no}: `{line}` is not a hex Unicode code point")))?;
            chars.push(c);
        }
        Self::from_chars(chars).map_err(|e| match e {
            Error::InvalidArgument { reason, .. } => format(reason),
            other => other,
        })
    }

    /// Writes [`to_text`](Self::to_text) to `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_text())
            .map_err(|e| Error::Io { path: path.display().to_string(), reason: e.to_string() })
    }

    /// Reads a file written by [`save`](Self::save).
    pub fn load(path: impl AsRef<Path>) -> Result<CharTokenizer> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Io { path: path.display().to_string(), reason: e.to_string() })?;
        Self::from_text(&text, &path.display().to_string())
    }
}

impl Tokenizer for CharTokenizer {
    fn vocab_size(&self) -> usize {
        CharTokenizer::vocab_size(self)
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        CharTokenizer::encode(self, text)
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        CharTokenizer::decode(self, ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn vocabulary_is_the_sorted_distinct_characters() {
        let tok = CharTokenizer::from_corpus("hello world\n").unwrap();
        assert_eq!(tok.chars(), &['\n', ' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']);
        assert_eq!(tok.encode("hello").unwrap(), vec![4, 3, 5, 5, 6]);
        assert_eq!(tok.decode(&[8, 6, 7, 5, 2, 0]).unwrap(), "world\n");
    }

    #[test]
    fn shakespeare_vocabulary_matches_nanogpt() {
        let corpus = crate::data::shakespeare::TinyShakespeare::load().unwrap();
        let tok = CharTokenizer::from_corpus(&corpus.text).unwrap();
        assert_eq!(tok.vocab_size(), 65);
        let expected: String = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz".into();
        assert_eq!(tok.chars().iter().collect::<String>(), expected);
        // nanoGPT's prepare.py: encode("hii there") == [46, 47, 47, 1, 58, 46, 43, 56, 43].
        assert_eq!(tok.encode("hii there").unwrap(), vec![46, 47, 47, 1, 58, 46, 43, 56, 43]);
    }

    #[test]
    fn unknown_characters_and_ids_are_clear_errors() {
        let tok = CharTokenizer::from_corpus("abc").unwrap();
        let err = tok.encode("abxc").unwrap_err().to_string();
        assert_eq!(err, "CharTokenizer::encode: character 'x' (U+0078) at position 2 is not in the vocabulary");
        let err = tok.decode(&[0, 3]).unwrap_err().to_string();
        assert_eq!(err, "CharTokenizer::decode: id 3 is out of range for a vocabulary of 3");
        assert!(CharTokenizer::from_corpus("").is_err());
        let err = CharTokenizer::from_chars(vec!['a', 'b', 'a']).unwrap_err().to_string();
        assert_eq!(err, "CharTokenizer::from_chars: 'a' is listed twice (ids 0 and 2)");
    }

    #[test]
    fn save_and_load_round_trip() {
        let tok = CharTokenizer::from_corpus("To be,\tor not\nto be: é 🎭").unwrap();
        let path = std::env::temp_dir().join(format!("aigc-char-tok-{}.txt", std::process::id()));
        tok.save(&path).unwrap();
        let back = CharTokenizer::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back, tok);
        assert!(matches!(CharTokenizer::load(&path), Err(Error::Io { .. })));
    }

    #[test]
    fn malformed_files_are_format_errors() {
        let parse = |text: &str| CharTokenizer::from_text(text, "v.txt").unwrap_err().to_string();
        assert_eq!(parse("0041\n"), format!("v.txt: the first line is not the header `{HEADER}`"));
        assert_eq!(parse(&format!("{HEADER}\n0041\nzz\n")), "v.txt: line 3: `zz` is not a hex Unicode code point");
        assert_eq!(parse(&format!("{HEADER}\nD800\n")), "v.txt: line 2: `D800` is not a hex Unicode code point");
        assert_eq!(parse(&format!("{HEADER}\n\n")), "v.txt: line 2: `` is not a hex Unicode code point");
        assert_eq!(parse(&format!("{HEADER}\n0041\n0041\n")), "v.txt: 'A' is listed twice (ids 0 and 1)");
        assert_eq!(parse(&format!("{HEADER}\n")), "v.txt: the vocabulary is empty");
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_the_identity(corpus in prop::collection::vec(any::<char>(), 1..40), picks in prop::collection::vec(any::<prop::sample::Index>(), 0..60)) {
            let tok = CharTokenizer::from_corpus(&corpus.iter().collect::<String>()).unwrap();
            let text: String = picks.iter().map(|i| tok.chars()[i.index(tok.vocab_size())]).collect();
            let ids = tok.encode(&text).unwrap();
            prop_assert_eq!(ids.len(), text.chars().count());
            prop_assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
            prop_assert_eq!(tok.decode(&ids).unwrap(), text);
        }
    }
}
