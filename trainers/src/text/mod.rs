//! Tokenizers: text to integer ids and back.
//!
//! - [`CharTokenizer`]: one id per distinct character of a corpus, sorted, as nanoGPT's
//!   `shakespeare_char/prepare.py` builds it.
//! - [`BpeTokenizer`]: GPT-2's byte-level byte-pair encoding (Sennrich et al. 2016; Radford
//!   et al. 2019): trains on a corpus, encodes any UTF-8 text, and reads and writes GPT-2's
//!   `vocab.json` + `merges.txt`.
//!
//! Both implement [`Tokenizer`], so a language-model trainer can take either.

pub mod bpe;
pub mod char_tokenizer;

pub use bpe::{BpeTokenizer, ENDOFTEXT};
pub use char_tokenizer::CharTokenizer;

use aigc_tensor::Result;

/// What a language model needs from a tokenizer.
pub trait Tokenizer {
    /// Number of ids; every id is below it.
    fn vocab_size(&self) -> usize;
    /// The ids of `text`.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// The text of `ids`.
    fn decode(&self, ids: &[u32]) -> Result<String>;
}
