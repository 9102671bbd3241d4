//! Byte-level byte-pair encoding, as in GPT-2 (Radford et al. 2019, "Language Models are
//! Unsupervised Multitask Learners", section 2.2), built on the BPE of Sennrich, Haddow &
//! Birch (2016, "Neural Machine Translation of Rare Words with Subword Units").
//!
//! **Byte level.** Text is UTF-8 bytes, and the 256 one-byte tokens are always in the
//! vocabulary, so every string encodes (no unknown token) and decodes back exactly, whatever
//! script or emoji it holds. Each byte is written as one printable character
//! ([`bytes_to_unicode`]: the space is `Ġ`, the newline `Ċ`), so that tokens are printable
//! strings in `vocab.json` and `merges.txt`.
//!
//! **Pre-tokenisation.** Merges never cross the boundaries of GPT-2's pattern
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, so " dog"
//! and "dog." do not become one token. [`pretokenize`] implements the pattern by hand.
//!
//! **Training** ([`BpeTokenizer::train`]) starts from the 256 bytes and repeatedly merges the
//! most frequent adjacent pair of tokens, counted over the distinct pre-tokens weighted by how
//! often each occurs, until the vocabulary has the size asked for. Ties go to the pair whose
//! (left, right) byte strings are lexicographically smallest, so training is deterministic.
//! Pair counts are kept up to date incrementally: a merge only rescans the words that contain
//! the merged pair, and a max-heap with lazy deletion finds the next pair.
//!
//! **Encoding** ([`BpeTokenizer::encode`]) splits each pre-token into bytes and applies the
//! learned merges in the order they were learned (lowest rank first) until none applies, with
//! a cache of pre-tokens already seen. Special tokens such as [`ENDOFTEXT`] get ids after the
//! merges and are recognised only by [`BpeTokenizer::encode_allowing_special`].
//!
//! **Files**: GPT-2's `vocab.json` (token string -> id) and `merges.txt` (a `#version: 0.2`
//! line, then one merge `left right` per line, in rank order), which Hugging Face `tokenizers`
//! reads too (`trainers/fixtures/bpe_compat.py` checks that it encodes identically).
//!
//! One approximation: GPT-2's `\p{L}` is the Unicode general category Letter, which the
//! standard library cannot test. A character counts as a letter here when it is
//! `is_alphabetic()` and not `is_numeric()` (which takes out the letter numbers such as Ⅻ,
//! `\p{N}` in GPT-2 too). The two agree on the letters of every script, but the Alphabetic
//! property also holds most vowel signs of the Indic and South-East Asian scripts and the
//! circled letters (Ⓐ), which GPT-2's pattern classes with punctuation. Text in those scripts
//! pre-tokenises into fewer, longer pieces here: "नमस्ते दुनिया" is `नमस ् ते " दुनिया"` here and
//! `नमस ् त े " द" ु न ि य ा` in GPT-2, so its ids differ from GPT-2's (they still decode back
//! exactly). Every other case, including emoji, CJK, combining accents and odd whitespace, is
//! checked against Hugging Face `tokenizers` by `encodes_exactly_like_hugging_face_tokenizers`.

use super::Tokenizer;
use aigc_tensor::{Error, Result};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::path::Path;
use std::rc::Rc;
use std::sync::Mutex;

/// GPT-2's end-of-text special token.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// The first line of a `merges.txt`.
const MERGES_HEADER: &str = "#version: 0.2";

/// The pre-token cache is cleared when it reaches this many entries.
const CACHE_LIMIT: usize = 1 << 16;

/// Bytes that GPT-2 writes as themselves: the printable characters of Latin-1.
const fn is_printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// GPT-2's byte order: the printable bytes ascending, then the other 68 bytes ascending. The
/// 256 one-byte tokens of a trained vocabulary have ids in this order, as in GPT-2's vocab.
const BYTE_ORDER: [u8; 256] = {
    let mut order = [0u8; 256];
    let (mut n, mut pass) = (0, 0);
    while pass < 2 {
        let mut b = 0;
        while b < 256 {
            if is_printable(b as u8) == (pass == 0) {
                order[n] = b as u8;
                n += 1;
            }
            b += 1;
        }
        pass += 1;
    }
    order
};

/// `BYTE_CHARS[b]` is the character that stands for byte `b`.
const BYTE_CHARS: [char; 256] = {
    let mut chars = ['\0'; 256];
    let mut next = 256;
    let mut b = 0;
    while b < 256 {
        chars[b] = if is_printable(b as u8) {
            b as u8 as char
        } else {
            next += 1;
            match char::from_u32(next - 1) {
                Some(c) => c,
                None => panic!("256..324 are code points"),
            }
        };
        b += 1;
    }
    chars
};

/// GPT-2's `bytes_to_unicode()`: a printable character for each byte. The printable bytes of
/// Latin-1 stand for themselves; the other 68 (controls, the space, the soft hyphen, ...)
/// are shifted to U+0100.. in byte order, so the space (0x20) is `Ġ` (U+0120).
pub fn bytes_to_unicode() -> [char; 256] {
    BYTE_CHARS
}

/// The byte a [`bytes_to_unicode`] character stands for.
fn unicode_to_byte(c: char) -> Option<u8> {
    let code = c as u32;
    match code {
        0..=255 if is_printable(code as u8) => Some(code as u8),
        256..=323 => BYTE_CHARS.iter().position(|&x| x == c).map(|b| b as u8),
        _ => None,
    }
}

/// A token's bytes written as [`bytes_to_unicode`] characters (its `vocab.json` key).
fn to_byte_chars(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| BYTE_CHARS[b as usize]).collect()
}

/// The character classes of GPT-2's pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// `\p{L}` (approximated: see the module docs).
    Letter,
    /// `\p{N}`: decimal digits, letter numbers (Ⅻ), other numbers (½, ²).
    Number,
    /// `\s`: the Unicode White_Space property.
    Space,
    /// `[^\s\p{L}\p{N}]`: punctuation, symbols, emoji, marks, controls.
    Other,
}

fn class(c: char) -> Class {
    if c.is_whitespace() {
        Class::Space
    } else if c.is_numeric() {
        Class::Number
    } else if c.is_alphabetic() {
        Class::Letter
    } else {
        Class::Other
    }
}

/// GPT-2's contractions, tried first and case-sensitively, as in the pattern.
const CONTRACTIONS: [&str; 7] = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"];

/// The byte length of the first pre-token of the non-empty `s`: the alternatives of GPT-2's
/// pattern, tried in order, as a backtracking regex engine would.
fn first_pretoken_len(s: &str) -> usize {
    // 's|'t|'re|'ve|'m|'ll|'d
    if let Some(c) = CONTRACTIONS.iter().find(|c| s.starts_with(**c)) {
        return c.len();
    }
    // ` ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+`: an optional space, then a run of one class. The
    // space is taken only when a non-space follows it; otherwise the run must start at once.
    let mut chars = s.chars();
    let (first, second) = (chars.next(), chars.next());
    let skip = match (first, second) {
        (Some(' '), Some(c)) if class(c) != Class::Space => 1,
        _ => 0,
    };
    let rest = &s[skip..];
    if let Some(head) = rest.chars().next()
        && class(head) != Class::Space
    {
        let kind = class(head);
        let run: usize = rest.chars().take_while(|&c| class(c) == kind).map(char::len_utf8).sum();
        return skip + run;
    }
    // `\s+(?!\S)|\s+`: a run of whitespace. If a non-space follows the run, `(?!\S)` makes
    // the engine give back the run's last character (which then starts the next pre-token,
    // " word" say), unless the run is a single character, which `\s+` takes alone.
    let (mut len, mut count, mut last) = (0, 0, 0);
    for c in s.chars().take_while(|c| c.is_whitespace()) {
        (len, count, last) = (len + c.len_utf8(), count + 1, c.len_utf8());
    }
    if len < s.len() && count >= 2 { len - last } else { len }
}

/// Splits `text` into GPT-2's pre-tokens; concatenated, they give back `text`.
///
/// ```
/// use aigc_trainers::text::bpe::pretokenize;
/// assert_eq!(pretokenize("I'm  here!\n"), ["I", "'m", " ", " here", "!", "\n"]);
/// ```
pub fn pretokenize(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(first_pretoken_len(rest));
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// `symbols` with every occurrence of the adjacent pair `(left, right)` replaced by `merged`,
/// scanning left to right (so `a a a` with the merge `a a` becomes `aa a`).
fn merge_pair(symbols: &[u32], (left, right): (u32, u32), merged: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(symbols.len());
    let mut i = 0;
    while i < symbols.len() {
        if i + 1 < symbols.len() && symbols[i] == left && symbols[i + 1] == right {
            out.push(merged);
            i += 2;
        } else {
            out.push(symbols[i]);
            i += 1;
        }
    }
    out
}

/// A GPT-2 style byte-level BPE tokenizer.
pub struct BpeTokenizer {
    /// `tokens[id]`: the bytes of token `id` (for a special token, the UTF-8 of its text).
    tokens: Vec<Vec<u8>>,
    /// `byte_ids[b]`: the id of the one-byte token `b`.
    byte_ids: [u32; 256],
    /// The merges in rank order (the order they were learned).
    merges: Vec<(u32, u32)>,
    /// Pair -> (rank, id of the merged token).
    ranks: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens (text, id), in id order.
    specials: Vec<(String, u32)>,
    /// Pre-token -> ids, for the pre-tokens already encoded.
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl BpeTokenizer {
    /// Learns merges on `corpus` until the vocabulary has `vocab_size` tokens (the 256 bytes
    /// plus `vocab_size - 256` merged tokens). Training stops early, with a smaller
    /// vocabulary, if no adjacent pair is left to merge. Add [`ENDOFTEXT`] afterwards with
    /// [`add_special_token`](Self::add_special_token) if the model needs it.
    pub fn train(corpus: &str, vocab_size: usize) -> Result<BpeTokenizer> {
        if vocab_size < 256 {
            return Err(Error::invalid(
                "BpeTokenizer::train",
                format!("vocab_size {vocab_size} is below 256, the number of byte tokens"),
            ));
        }
        if vocab_size > u32::MAX as usize {
            return Err(Error::invalid("BpeTokenizer::train", format!("vocab_size {vocab_size} does not fit in u32")));
        }
        let mut trainer = Trainer::new(corpus);
        while trainer.tokens.len() < vocab_size && trainer.merge_best() {}
        let Trainer { tokens, byte_ids, merges, .. } = trainer;
        let tokens = tokens.iter().map(|t| t.to_vec()).collect();
        Ok(Self::assemble(tokens, byte_ids, merges, Vec::new()))
    }

    /// Builds the lookup tables from the bytes of every token, the ids of the one-byte
    /// tokens, the merges as (left, right, merged) in rank order, and the special tokens.
    fn assemble(
        tokens: Vec<Vec<u8>>,
        byte_ids: [u32; 256],
        merges: Vec<(u32, u32, u32)>,
        specials: Vec<(String, u32)>,
    ) -> BpeTokenizer {
        let ranks = merges.iter().enumerate().map(|(rank, &(l, r, m))| ((l, r), (rank as u32, m))).collect();
        BpeTokenizer {
            tokens,
            byte_ids,
            merges: merges.iter().map(|&(l, r, _)| (l, r)).collect(),
            ranks,
            specials,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Number of ids: bytes, merged tokens and special tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The learned merges (left id, right id), in rank order.
    pub fn merges(&self) -> &[(u32, u32)] {
        &self.merges
    }

    /// The bytes of token `id` (a special token's text), or `None` for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.tokens.get(id as usize).map(Vec::as_slice)
    }

    /// The id of special token `text`, if it is one.
    pub fn special_id(&self, text: &str) -> Option<u32> {
        self.specials.iter().find(|(s, _)| s == text).map(|&(_, id)| id)
    }

    /// Adds a special token with the next free id (after the merges, as GPT-2's
    /// `<|endoftext|>` = 50256 follows its 256 bytes and 50,000 merges) and returns the id.
    pub fn add_special_token(&mut self, text: &str) -> Result<u32> {
        let op = "BpeTokenizer::add_special_token";
        if text.is_empty() {
            return Err(Error::invalid(op, "a special token cannot be empty"));
        }
        if self.special_id(text).is_some() {
            return Err(Error::invalid(op, format!("{text:?} is already a special token")));
        }
        if let Some(id) = self.tokens.iter().position(|t| to_byte_chars(t) == text) {
            return Err(Error::invalid(op, format!("{text:?} is already the written form of token {id}")));
        }
        let id = u32::try_from(self.tokens.len()).map_err(|_| Error::invalid(op, "the vocabulary is full"))?;
        self.tokens.push(text.as_bytes().to_vec());
        self.specials.push((text.to_string(), id));
        Ok(id)
    }

    /// The ids of `text`. Special-token text is encoded as ordinary text, as GPT-2's encoder
    /// does; use [`encode_allowing_special`](Self::encode_allowing_special) to map it to the
    /// special ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        for piece in pretokenize(text) {
            self.encode_pretoken(piece, &mut ids);
        }
        ids
    }

    /// Like [`encode`](Self::encode), but every occurrence of a special token's text (such
    /// as [`ENDOFTEXT`]) becomes its id; the text between them is encoded as usual.
    pub fn encode_allowing_special(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        loop {
            // The leftmost special token in `rest` (the longest where two start together).
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, std::cmp::Reverse(s.len()), *id)))
                .min();
            let Some((at, std::cmp::Reverse(len), id)) = next else { break };
            ids.extend(self.encode(&rest[..at]));
            ids.push(id);
            rest = &rest[at + len..];
        }
        ids.extend(self.encode(rest));
        ids
    }

    /// Encodes one pre-token: its bytes, then the merges by rank until none applies.
    fn encode_pretoken(&self, piece: &str, out: &mut Vec<u32>) {
        if let Some(ids) = self.lock_cache().get(piece) {
            out.extend_from_slice(ids);
            return;
        }
        let mut symbols: Vec<u32> = piece.bytes().map(|b| self.byte_ids[b as usize]).collect();
        while symbols.len() > 1 {
            let best = symbols
                .windows(2)
                .filter_map(|p| self.ranks.get(&(p[0], p[1])).map(|&(rank, merged)| (rank, (p[0], p[1]), merged)))
                .min();
            let Some((_, pair, merged)) = best else { break };
            symbols = merge_pair(&symbols, pair, merged);
        }
        out.extend_from_slice(&symbols);
        let mut cache = self.lock_cache();
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(piece.to_string(), symbols);
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u32>>> {
        // Every update of the cache is a single insert or clear, so a lock poisoned by a
        // panic elsewhere still guards a consistent map.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The bytes of `ids`, concatenated; an unknown id is an error.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        for &id in ids {
            let token = self.token_bytes(id).ok_or_else(|| {
                Error::invalid(
                    "BpeTokenizer::decode",
                    format!("id {id} is out of range for a vocabulary of {}", self.tokens.len()),
                )
            })?;
            bytes.extend_from_slice(token);
        }
        Ok(bytes)
    }

    /// The text of `ids`. A sequence that stops inside a multi-byte character (ids cut from a
    /// longer text, or sampled by a model) has its broken bytes replaced by U+FFFD, as GPT-2
    /// (`errors="replace"`) and Hugging Face do; [`decode_bytes`](Self::decode_bytes) is exact.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }

    /// The written form of token `id`: its bytes as [`bytes_to_unicode`] characters, or a
    /// special token's text as it is.
    fn token_string(&self, id: usize) -> String {
        match self.specials.iter().find(|&&(_, s)| s as usize == id) {
            Some((text, _)) => text.clone(),
            None => to_byte_chars(&self.tokens[id]),
        }
    }

    /// GPT-2's files as strings: `vocab.json` (one line, keys in id order) and `merges.txt`.
    pub fn to_gpt2_strings(&self) -> (String, String) {
        let entries: Vec<String> = (0..self.tokens.len())
            .map(|id| {
                let key = serde_json::Value::String(self.token_string(id)).to_string();
                format!("{key}: {id}")
            })
            .collect();
        let vocab = format!("{{{}}}", entries.join(", "));
        let mut merges = format!("{MERGES_HEADER}\n");
        for &(l, r) in &self.merges {
            merges.push_str(&format!("{} {}\n", self.token_string(l as usize), self.token_string(r as usize)));
        }
        (vocab, merges)
    }

    /// Parses GPT-2's `vocab.json` and `merges.txt`. Vocabulary entries that are neither a
    /// single byte nor made by a merge are special tokens (GPT-2's `<|endoftext|>`).
    pub fn from_gpt2_strings(vocab_json: &str, merges_txt: &str) -> Result<BpeTokenizer> {
        Self::parse(vocab_json, "vocab.json", merges_txt, "merges.txt")
    }

    /// Writes `vocab.json` and `merges.txt` into the directory `dir` (which must exist).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let (vocab, merges) = self.to_gpt2_strings();
        for (name, text) in [("vocab.json", vocab), ("merges.txt", merges)] {
            let path = dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| Error::Io { path: path.display().to_string(), reason: e.to_string() })?;
        }
        Ok(())
    }

    /// Reads `vocab.json` and `merges.txt` from the directory `dir` (GPT-2's files load too).
    pub fn load(dir: impl AsRef<Path>) -> Result<BpeTokenizer> {
        let dir = dir.as_ref();
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map(|text| (text, path.display().to_string()))
                .map_err(|e| Error::Io { path: path.display().to_string(), reason: e.to_string() })
        };
        let ((vocab, vocab_what), (merges, merges_what)) = (read("vocab.json")?, read("merges.txt")?);
        Self::parse(&vocab, &vocab_what, &merges, &merges_what)
    }

    fn parse(vocab_json: &str, vocab_what: &str, merges_txt: &str, merges_what: &str) -> Result<BpeTokenizer> {
        let vocab_err = |reason: String| Error::Format { what: vocab_what.to_string(), reason };
        let merges_err = |line: usize, reason: String| Error::Format {
            what: merges_what.to_string(),
            reason: format!("line {line}: {reason}"),
        };

        // vocab.json: an object whose ids are exactly 0..n.
        let value: serde_json::Value =
            serde_json::from_str(vocab_json).map_err(|e| vocab_err(format!("not valid JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| vocab_err("expected a JSON object mapping each token to its id".to_string()))?;
        let n = object.len();
        let mut by_id: Vec<Option<&str>> = vec![None; n];
        for (token, id) in object {
            let id = id.as_u64().filter(|&id| id < n as u64).ok_or_else(|| {
                vocab_err(format!("token {token:?} has id {id}; the ids of {n} tokens must be 0..{n}"))
            })? as usize;
            if let Some(other) = by_id[id].replace(token) {
                return Err(vocab_err(format!("tokens {other:?} and {token:?} both have id {id}")));
            }
        }
        let by_id: Vec<&str> = by_id.into_iter().map(|t| t.unwrap_or_default()).collect();
        let ids: HashMap<&str, u32> = by_id.iter().enumerate().map(|(id, &t)| (t, id as u32)).collect();

        // The 256 one-byte tokens.
        let mut regular: HashSet<u32> = HashSet::new();
        let mut byte_ids = [0u32; 256];
        for b in 0..=255u8 {
            let key = BYTE_CHARS[b as usize].to_string();
            let id = *ids.get(key.as_str()).ok_or_else(|| {
                vocab_err(format!(
                    "the byte 0x{b:02X} (token {key:?}) is missing; a byte-level vocabulary has all 256 bytes"
                ))
            })?;
            regular.insert(id);
            byte_ids[b as usize] = id;
        }

        // merges.txt: an optional version line, then `left right` per line.
        let mut merges = Vec::new();
        let mut seen: HashMap<(u32, u32), usize> = HashMap::new();
        for (i, line) in merges_txt.lines().enumerate() {
            let line_no = i + 1;
            if i == 0 && line.starts_with("#version") {
                if !line.starts_with(MERGES_HEADER) {
                    return Err(merges_err(line_no, format!("unsupported `{line}` (expected `{MERGES_HEADER}`)")));
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let parts: Vec<&str> = line.split(' ').collect();
            let [left, right] = parts[..] else {
                return Err(merges_err(line_no, format!("expected two tokens separated by one space, got {line:?}")));
            };
            let mut pair = [0u32; 2];
            for (slot, part) in pair.iter_mut().zip([left, right]) {
                let id = *ids.get(part).ok_or_else(|| merges_err(line_no, format!("{part:?} is not in vocab.json")))?;
                if !regular.contains(&id) {
                    return Err(merges_err(
                        line_no,
                        format!("{part:?} is neither a byte nor made by an earlier merge"),
                    ));
                }
                *slot = id;
            }
            let joined = format!("{left}{right}");
            let merged = *ids
                .get(joined.as_str())
                .ok_or_else(|| merges_err(line_no, format!("the merged token {joined:?} is not in vocab.json")))?;
            if let Some(first) = seen.insert((pair[0], pair[1]), line_no) {
                return Err(merges_err(line_no, format!("the merge {line:?} is listed twice (first at line {first})")));
            }
            regular.insert(merged);
            merges.push((pair[0], pair[1], merged));
        }

        // Bytes of every token; the entries no merge makes are special tokens. A regular token
        // is written in byte characters: a byte is, and a merge concatenates two such tokens.
        let mut tokens = Vec::with_capacity(n);
        let mut specials = Vec::new();
        for (id, &token) in by_id.iter().enumerate() {
            if regular.contains(&(id as u32)) {
                tokens.push(token.chars().filter_map(unicode_to_byte).collect());
            } else {
                tokens.push(token.as_bytes().to_vec());
                specials.push((token.to_string(), id as u32));
            }
        }
        Ok(Self::assemble(tokens, byte_ids, merges, specials))
    }
}

impl Tokenizer for BpeTokenizer {
    fn vocab_size(&self) -> usize {
        BpeTokenizer::vocab_size(self)
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(BpeTokenizer::encode(self, text))
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        BpeTokenizer::decode(self, ids)
    }
}

impl Clone for BpeTokenizer {
    /// A copy with an empty cache.
    fn clone(&self) -> Self {
        BpeTokenizer {
            tokens: self.tokens.clone(),
            byte_ids: self.byte_ids,
            merges: self.merges.clone(),
            ranks: self.ranks.clone(),
            specials: self.specials.clone(),
            cache: Mutex::new(HashMap::new()),
        }
    }
}

impl PartialEq for BpeTokenizer {
    /// Same tokens, merges and special tokens (the cache does not count).
    fn eq(&self, other: &Self) -> bool {
        self.tokens == other.tokens && self.merges == other.merges && self.specials == other.specials
    }
}

impl std::fmt::Debug for BpeTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpeTokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("merges", &self.merges.len())
            .field("specials", &self.specials)
            .finish()
    }
}

/// A candidate merge in the trainer's heap: the pair with the highest count pops first, and
/// among equal counts the pair whose (left, right) bytes are lexicographically smallest.
struct Candidate {
    count: u64,
    pair: (u32, u32),
    left: Rc<[u8]>,
    right: Rc<[u8]>,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then_with(|| (&other.left, &other.right).cmp(&(&self.left, &self.right)))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

/// The state of BPE training.
///
/// Invariants between merges: `pair_counts[p]` is the number of occurrences of the adjacent
/// pair `p` over all words, weighted by word count; `where_[p]` lists (possibly with repeats,
/// possibly stale) the words that contain `p`; and every pair with a positive count has an
/// entry in `heap` whose count is at least its current count. Counts only fall, except for
/// pairs that contain a newly merged token, which are pushed when they appear; so an entry
/// whose count is out of date is re-pushed with the current count when it reaches the top.
struct Trainer {
    /// `tokens[id]`: the bytes of token `id`.
    tokens: Vec<Rc<[u8]>>,
    ids: HashMap<Rc<[u8]>, u32>,
    /// `byte_ids[b]`: the id of the one-byte token `b` (GPT-2's byte order).
    byte_ids: [u32; 256],
    /// Each distinct pre-token as its current token ids, and how often it occurs.
    words: Vec<(Vec<u32>, u64)>,
    pair_counts: HashMap<(u32, u32), u64>,
    where_: HashMap<(u32, u32), Vec<u32>>,
    heap: BinaryHeap<Candidate>,
    /// (left, right, merged) in the order learned.
    merges: Vec<(u32, u32, u32)>,
}

impl Trainer {
    fn new(corpus: &str) -> Trainer {
        let tokens: Vec<Rc<[u8]>> = BYTE_ORDER.iter().map(|&b| Rc::from([b].as_slice())).collect();
        let ids = tokens.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
        let mut byte_ids = [0u32; 256];
        for (id, &b) in BYTE_ORDER.iter().enumerate() {
            byte_ids[b as usize] = id as u32;
        }

        let mut word_counts: HashMap<&str, u64> = HashMap::new();
        for piece in pretokenize(corpus) {
            *word_counts.entry(piece).or_default() += 1;
        }
        let mut distinct: Vec<(&str, u64)> = word_counts.into_iter().collect();
        distinct.sort_unstable();
        let words: Vec<(Vec<u32>, u64)> =
            distinct.into_iter().map(|(w, count)| (w.bytes().map(|b| byte_ids[b as usize]).collect(), count)).collect();

        let mut pair_counts: HashMap<(u32, u32), u64> = HashMap::new();
        let mut where_: HashMap<(u32, u32), Vec<u32>> = HashMap::new();
        for (w, (symbols, count)) in words.iter().enumerate() {
            for p in symbols.windows(2) {
                *pair_counts.entry((p[0], p[1])).or_default() += count;
                where_.entry((p[0], p[1])).or_default().push(w as u32);
            }
        }
        let mut trainer =
            Trainer { tokens, ids, byte_ids, words, pair_counts, where_, heap: BinaryHeap::new(), merges: Vec::new() };
        let pairs: Vec<(u32, u32)> = trainer.pair_counts.keys().copied().collect();
        for pair in pairs {
            trainer.push(pair);
        }
        trainer
    }

    /// Puts `pair` on the heap with its current count.
    fn push(&mut self, pair: (u32, u32)) {
        let count = self.pair_counts.get(&pair).copied().unwrap_or(0);
        if count > 0 {
            let (left, right) = (self.tokens[pair.0 as usize].clone(), self.tokens[pair.1 as usize].clone());
            self.heap.push(Candidate { count, pair, left, right });
        }
    }

    /// Merges the most frequent pair; false when no pair is left.
    fn merge_best(&mut self) -> bool {
        let pair = loop {
            let Some(top) = self.heap.pop() else { return false };
            let current = self.pair_counts.get(&top.pair).copied().unwrap_or(0);
            if current == top.count {
                break top.pair;
            }
            self.push(top.pair); // out of date: back in at its current count (if any)
        };

        // The merged token (reusing the id if another merge already made the same bytes).
        let bytes: Rc<[u8]> = [&self.tokens[pair.0 as usize][..], &self.tokens[pair.1 as usize][..]].concat().into();
        let merged = match self.ids.get(&bytes) {
            Some(&id) => id,
            None => {
                let id = self.tokens.len() as u32;
                self.tokens.push(bytes.clone());
                self.ids.insert(bytes, id);
                id
            }
        };
        self.merges.push((pair.0, pair.1, merged));

        // Rewrite the words that contain the pair, moving their pair counts from the old
        // spelling to the new one.
        let mut affected = self.where_.remove(&pair).unwrap_or_default();
        affected.sort_unstable();
        affected.dedup();
        let mut new_pairs = HashSet::new();
        for w in affected {
            let (symbols, count) = &mut self.words[w as usize];
            if !symbols.windows(2).any(|p| (p[0], p[1]) == pair) {
                continue; // stale: an earlier merge already took this word's occurrences
            }
            for p in symbols.windows(2) {
                let key = (p[0], p[1]);
                if let Some(c) = self.pair_counts.get_mut(&key) {
                    *c -= *count;
                    if *c == 0 {
                        self.pair_counts.remove(&key);
                    }
                }
            }
            *symbols = merge_pair(symbols, pair, merged);
            for p in symbols.windows(2) {
                let key = (p[0], p[1]);
                *self.pair_counts.entry(key).or_default() += *count;
                if key.0 == merged || key.1 == merged {
                    self.where_.entry(key).or_default().push(w);
                    new_pairs.insert(key);
                }
            }
        }
        for p in new_pairs {
            self.push(p);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A slice of tiny Shakespeare, cut at a character boundary.
    fn shakespeare(bytes: usize) -> String {
        let text = crate::data::shakespeare::TinyShakespeare::load().unwrap().text;
        text[..bytes].to_string()
    }

    #[test]
    fn bytes_to_unicode_matches_gpt2() {
        let table = bytes_to_unicode();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[0], 'Ā');
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[0xAD], 'Ń'); // the soft hyphen is the last of the shifted bytes
        assert_eq!(table[0xFF], 'ÿ');
        let distinct: HashSet<char> = table.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        for b in 0..=255u8 {
            assert_eq!(unicode_to_byte(table[b as usize]), Some(b));
        }
        assert_eq!(unicode_to_byte(' '), None);
        assert_eq!(unicode_to_byte('Ņ'), None);
        // GPT-2's vocab.json starts "!", "\"", ... and has "Ā" at id 188.
        assert_eq!((BYTE_ORDER[0], BYTE_ORDER[93], BYTE_ORDER[188]), (b'!', b'~', 0));
    }

    #[test]
    fn pretokenize_follows_gpt2_pattern() {
        let cases: &[(&str, &[&str])] = &[
            ("Hello world", &["Hello", " world"]),
            // Contractions are split off, lower case only (GPT-2's pattern has no (?i)).
            (
                "I'm can't we've they'll he'd it's you're",
                &["I", "'m", " can", "'t", " we", "'ve", " they", "'ll", " he", "'d", " it", "'s", " you", "'re"],
            ),
            ("IT'S", &["IT", "'", "S"]),
            ("'sup", &["'s", "up"]),
            // Multiple spaces: all but the last go alone; the last joins the word.
            ("a   b", &["a", "  ", " b"]),
            // Trailing spaces stay one piece; a space run before a newline too.
            ("end   ", &["end", "   "]),
            ("x  \n y", &["x", "  \n", " y"]),
            // A lone non-space whitespace before a word is its own piece.
            ("a\nb\tc", &["a", "\n", "b", "\t", "c"]),
            ("\n\n\nThe", &["\n\n", "\n", "The"]),
            // Numbers and punctuation take an optional leading space, as letters do.
            ("in 2024, $3.50!!", &["in", " 2024", ",", " $", "3", ".", "50", "!!"]),
            ("x ?!", &["x", " ?!"]),
            ("  ", &["  "]),
            (" ", &[" "]),
            ("", &[]),
            // Unicode letters and numbers.
            ("café naïve Ελληνικά 東京", &["café", " naïve", " Ελληνικά", " 東京"]),
            ("Ⅻ½²", &["Ⅻ½²"]),
            // Emoji are neither letters nor numbers: they run with punctuation.
            ("hi 🎭🎭!", &["hi", " 🎭🎭!"]),
            ("👨‍👩‍👧 ok", &["👨‍👩‍👧", " ok"]),
            // A non-breaking space is whitespace, but only U+0020 joins the next word.
            ("a\u{a0}b", &["a", "\u{a0}", "b"]),
        ];
        for (text, expected) in cases {
            assert_eq!(&pretokenize(text), expected, "{text:?}");
        }
    }

    #[test]
    fn training_learns_the_most_frequent_pairs_first() {
        // Pre-tokens: "ab" once, " ab" twice, " abc" three times. Pair counts: (a,b) 6,
        // (Ġ,a) 5, (b,c) 3. After (a,b): (Ġ,ab) 5, (ab,c) 3. After (Ġ,ab): (Ġab,c) 3.
        let tok = BpeTokenizer::train("ab ab ab abc abc abc", 259).unwrap();
        let merges: Vec<(String, String)> =
            tok.merges().iter().map(|&(l, r)| (tok.token_string(l as usize), tok.token_string(r as usize))).collect();
        assert_eq!(merges[0], ("a".into(), "b".into()));
        assert_eq!(merges[1], ("Ġ".into(), "ab".into()));
        assert_eq!(merges[2], ("Ġab".into(), "c".into()));
        assert_eq!(tok.vocab_size(), 259);
        assert_eq!(tok.encode(" abc"), vec![258]);
        assert_eq!(tok.encode("abc"), vec![256, tok.byte_ids[b'c' as usize]]);
    }

    #[test]
    fn ties_go_to_the_lexicographically_smallest_pair() {
        // Every adjacent pair occurs once: the merges come out in byte order.
        let tok = BpeTokenizer::train("dcba", 259).unwrap();
        let merged: Vec<Vec<u8>> = (256..259).map(|id| tok.token_bytes(id).unwrap().to_vec()).collect();
        assert_eq!(merged, [b"ba".to_vec(), b"cba".to_vec(), b"dcba".to_vec()]);
        // Nothing left to merge: training stops early.
        assert_eq!(BpeTokenizer::train("ab", 300).unwrap().vocab_size(), 257);
        assert!(BpeTokenizer::train("ab", 255).is_err());
    }

    #[test]
    fn training_matches_a_full_recount_at_every_merge() {
        // The incremental counts must pick the same merges as recounting from scratch.
        let corpus = shakespeare(3000);
        let tok = BpeTokenizer::train(&corpus, 256 + 60).unwrap();
        let mut words: Vec<Vec<Vec<u8>>> =
            pretokenize(&corpus).iter().map(|w| w.bytes().map(|b| vec![b]).collect()).collect();
        for &(l, r) in tok.merges() {
            let mut counts: HashMap<(Vec<u8>, Vec<u8>), u64> = HashMap::new();
            for w in &words {
                for p in w.windows(2) {
                    *counts.entry((p[0].clone(), p[1].clone())).or_default() += 1;
                }
            }
            let best = counts.iter().max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0))).unwrap().0.clone();
            let learned = (tok.token_bytes(l).unwrap().to_vec(), tok.token_bytes(r).unwrap().to_vec());
            assert_eq!(learned, best);
            for w in &mut words {
                let mut out: Vec<Vec<u8>> = Vec::new();
                let mut i = 0;
                while i < w.len() {
                    if i + 1 < w.len() && (w[i].clone(), w[i + 1].clone()) == best {
                        out.push([w[i].clone(), w[i + 1].clone()].concat());
                        i += 2;
                    } else {
                        out.push(w[i].clone());
                        i += 1;
                    }
                }
                *w = out;
            }
        }
    }

    #[test]
    fn training_is_deterministic_and_compresses() {
        let corpus = shakespeare(20_000);
        let a = BpeTokenizer::train(&corpus, 400).unwrap();
        let b = BpeTokenizer::train(&corpus, 400).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.vocab_size(), 400);
        let ids = a.encode(&corpus);
        // 144 merges take the text from 20,000 bytes to about 11,000 tokens.
        assert!(ids.len() * 10 < corpus.len() * 6, "{} ids for {} bytes", ids.len(), corpus.len());
        assert_eq!(a.decode(&ids).unwrap(), corpus);
    }

    #[test]
    fn special_tokens_follow_the_merges_and_are_opt_in() {
        let mut tok = BpeTokenizer::train(&shakespeare(5000), 300).unwrap();
        let eot = tok.add_special_token(ENDOFTEXT).unwrap();
        assert_eq!(eot, 300);
        assert_eq!(tok.special_id(ENDOFTEXT), Some(300));
        let text = "Hello<|endoftext|> world";
        let ids = tok.encode_allowing_special(text);
        assert!(ids.contains(&eot));
        assert_eq!(ids, [tok.encode("Hello"), vec![eot], tok.encode(" world")].concat());
        assert!(!tok.encode(text).contains(&eot));
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert!(tok.add_special_token(ENDOFTEXT).is_err());
        assert!(tok.add_special_token("").is_err());
        assert!(tok.add_special_token("a").is_err());
    }

    #[test]
    fn save_and_load_give_identical_encodings() {
        let mut tok = BpeTokenizer::train(&shakespeare(10_000), 350).unwrap();
        tok.add_special_token(ENDOFTEXT).unwrap();
        let dir = std::env::temp_dir().join(format!("aigc-bpe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        tok.save(&dir).unwrap();
        let back = BpeTokenizer::load(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back, tok);
        let text = "KING RICHARD III:\nWhat's this? 'Tis  naïve 🎭<|endoftext|>\r\n ";
        assert_eq!(back.encode(text), tok.encode(text));
        assert_eq!(back.encode_allowing_special(text), tok.encode_allowing_special(text));
        let (vocab, merges) = tok.to_gpt2_strings();
        assert!(vocab.starts_with(r##"{"!": 0, "\"": 1, "#": 2"##), "{}", &vocab[..40]);
        assert!(vocab.ends_with(r#""<|endoftext|>": 350}"#));
        assert!(merges.starts_with("#version: 0.2\n"));
        assert_eq!(merges.lines().count(), 1 + 94);
        assert!(matches!(BpeTokenizer::load(std::env::temp_dir().join("aigc-no-such-dir")), Err(Error::Io { .. })));
    }

    #[test]
    fn malformed_files_are_format_errors() {
        let tok = BpeTokenizer::train("aaab", 258).unwrap();
        let (vocab, merges) = tok.to_gpt2_strings();
        let err = |v: &str, m: &str| BpeTokenizer::from_gpt2_strings(v, m).unwrap_err().to_string();
        assert!(err("{", &merges).starts_with("vocab.json: not valid JSON"));
        assert_eq!(err("[1]", &merges), "vocab.json: expected a JSON object mapping each token to its id");
        let bad_id = vocab.replace("\"a\": 64", "\"a\": -1");
        assert_eq!(err(&bad_id, &merges), "vocab.json: token \"a\" has id -1; the ids of 258 tokens must be 0..258");
        let dup = vocab.replace("\"a\": 64", "\"a\": 65");
        assert_eq!(err(&dup, &merges), "vocab.json: tokens \"a\" and \"b\" both have id 65");
        let missing = vocab.replace("\"a\": 64", "\"A\u{300}\": 64");
        assert_eq!(
            err(&missing, &merges),
            "vocab.json: the byte 0x61 (token \"a\") is missing; a byte-level vocabulary has all 256 bytes"
        );
        assert_eq!(
            err(&vocab, "#version: 0.3\n"),
            "merges.txt: line 1: unsupported `#version: 0.3` (expected `#version: 0.2`)"
        );
        assert_eq!(
            err(&vocab, "#version: 0.2\na  a\n"),
            "merges.txt: line 2: expected two tokens separated by one space, got \"a  a\""
        );
        assert_eq!(
            err(&vocab, "a x y\n"),
            "merges.txt: line 1: expected two tokens separated by one space, got \"a x y\""
        );
        assert_eq!(err(&vocab, "a 😀\n"), "merges.txt: line 1: \"😀\" is not in vocab.json");
        assert_eq!(err(&vocab, "a c\n"), "merges.txt: line 1: the merged token \"ac\" is not in vocab.json");
        assert_eq!(
            err(&vocab, "aa a\na a\n"),
            "merges.txt: line 1: \"aa\" is neither a byte nor made by an earlier merge"
        );
        assert_eq!(
            err(&vocab, "a a\na a\n"),
            "merges.txt: line 2: the merge \"a a\" is listed twice (first at line 1)"
        );
        let round = BpeTokenizer::from_gpt2_strings(&vocab, &merges).unwrap();
        assert_eq!(round, tok);
    }

    /// The files that `fixtures/bpe_compat.py` encodes with Hugging Face `tokenizers`.
    const FIXTURE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/bpe");

    /// The fixture tokenizer: 50,000 characters of tiny Shakespeare, 450 tokens, then
    /// `<|endoftext|>` (id 450).
    fn fixture_tokenizer() -> BpeTokenizer {
        let mut tok = BpeTokenizer::train(&shakespeare(50_000), 450).unwrap();
        tok.add_special_token(ENDOFTEXT).unwrap();
        tok
    }

    /// Rewrites the fixture files; then run `python trainers/fixtures/bpe_compat.py`.
    #[test]
    #[ignore = "writes trainers/fixtures/bpe/{vocab.json,merges.txt}"]
    fn write_compat_fixture() {
        std::fs::create_dir_all(FIXTURE_DIR).unwrap();
        fixture_tokenizer().save(FIXTURE_DIR).unwrap();
    }

    #[test]
    fn training_reproduces_the_committed_fixture() {
        assert_eq!(BpeTokenizer::load(FIXTURE_DIR).unwrap(), fixture_tokenizer());
    }

    #[test]
    fn encodes_exactly_like_hugging_face_tokenizers() {
        let tok = BpeTokenizer::load(FIXTURE_DIR).unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/bpe_expected.json");
        let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let cases = expected["cases"].as_array().unwrap();
        assert!(cases.len() >= 20);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let ours = if case["allow_special"].as_bool().unwrap() {
                tok.encode_allowing_special(text)
            } else {
                tok.encode(text)
            };
            assert_eq!(ours, ids, "{text:?}");
            assert_eq!(tok.decode(&ids).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
        }
    }

    /// The timing of the report: `cargo test -p aigc-trainers --release -- --ignored --nocapture bpe_training_time`.
    #[test]
    #[ignore = "trains 1000 merges on the full corpus: run in release mode"]
    fn bpe_training_time_on_tiny_shakespeare() {
        let corpus = crate::data::shakespeare::TinyShakespeare::load().unwrap().text;
        let start = std::time::Instant::now();
        let tok = BpeTokenizer::train(&corpus, 256 + 1000).unwrap();
        let train_seconds = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        let ids = tok.encode(&corpus);
        let encode_seconds = start.elapsed().as_secs_f64();
        assert_eq!(tok.decode(&ids).unwrap(), corpus);
        println!(
            "BPE: 1000 merges on {} bytes in {train_seconds:.2} s; encoding the corpus: {encode_seconds:.2} s, \
             {} tokens ({:.2} bytes/token)",
            corpus.len(),
            ids.len(),
            corpus.len() as f64 / ids.len() as f64
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_utf8_string_round_trips(text in any::<String>(), ascii in "[ a-z'\n]{0,40}") {
            let tok = trained();
            for s in [text.as_str(), ascii.as_str()] {
                let ids = tok.encode(s);
                prop_assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
                prop_assert_eq!(tok.decode_bytes(&ids).unwrap(), s.as_bytes());
                prop_assert_eq!(pretokenize(s).concat(), s);
            }
        }
    }

    /// A small tokenizer shared by the property tests.
    fn trained() -> &'static BpeTokenizer {
        static TOK: std::sync::OnceLock<BpeTokenizer> = std::sync::OnceLock::new();
        TOK.get_or_init(|| BpeTokenizer::train(&shakespeare(20_000), 400).unwrap())
    }
}
