//! The UCI 8x8 optical digits (scikit-learn's copy, CC BY 4.0, Alpaydin & Kaynak 1998):
//! 1797 grey-scale 8x8 images of the digits 0-9, pixel counts 0-16. The gzip file
//! (57 KB) is embedded in the crate, so this data set needs no download.

use aigc_tensor::{DType, Device, Error, Result, Tensor};
use std::io::Read;

/// The embedded `digits.csv.gz` (see `data/digits/SOURCE.md` at the repository root).
const DIGITS_GZ: &[u8] = include_bytes!("../../../data/digits/digits.csv.gz");

/// Images `[n, 64]` scaled to [0, 1] (f32) and labels `[n]` (i64).
pub struct Digits {
    pub images: Tensor,
    pub labels: Tensor,
}

impl Digits {
    /// The embedded data set, in file order.
    pub fn load() -> Result<Digits> {
        parse(DIGITS_GZ, "embedded digits.csv.gz")
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.numel()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shuffles with `seed` and splits off the last `test_fraction` as a test set.
    pub fn split(&self, test_fraction: f64, seed: u64) -> Result<(Digits, Digits)> {
        if !(0.0..1.0).contains(&test_fraction) {
            return Err(Error::invalid("Digits::split", format!("test fraction {test_fraction} must be in [0, 1)")));
        }
        let n = self.len();
        let order = Tensor::randperm(n, &self.images.device(), seed)?;
        let (images, labels) = (self.images.index_select(0, &order)?, self.labels.index_select(0, &order)?);
        let n_train = n - (n as f64 * test_fraction).round() as usize;
        let part = |start, len| -> Result<Digits> {
            Ok(Digits { images: images.narrow(0, start, len)?, labels: labels.narrow(0, start, len)? })
        };
        Ok((part(0, n_train)?, part(n_train, n - n_train)?))
    }
}

/// Parses gzip'd CSV rows of 64 pixel counts (0..=16) and a label (0..=9).
pub fn parse(gz: &[u8], what: &str) -> Result<Digits> {
    let format = |reason: String| Error::Format { what: what.to_string(), reason };
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_string(&mut text)
        .map_err(|e| format(format!("not a gzip'd text file: {e}")))?;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let values: Vec<&str> = line.split(',').collect();
        if values.len() != 65 {
            return Err(format(format!(
                "line {}: {} values, expected 65 (64 pixels and a label)",
                i + 1,
                values.len()
            )));
        }
        for (j, v) in values.iter().enumerate() {
            let x: u8 = v
                .trim()
                .parse()
                .map_err(|_| format(format!("line {}, column {}: `{v}` is not an integer", i + 1, j + 1)))?;
            let limit = if j < 64 { 16 } else { 9 };
            if x > limit {
                return Err(format(format!("line {}, column {}: {x} is above {limit}", i + 1, j + 1)));
            }
            if j < 64 { pixels.push(x as f32 / 16.0) } else { labels.push(x as i64) }
        }
    }
    let n = labels.len();
    let dev = Device::Cpu;
    Ok(Digits {
        images: Tensor::from_vec(pixels, [n, 64], &dev)?,
        labels: Tensor::from_vec(labels, n, &dev)?.to_dtype(DType::I64)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_digits_have_1797_images_and_balanced_labels() {
        let d = Digits::load().unwrap();
        assert_eq!(d.images.dims(), &[1797, 64]);
        assert_eq!(d.labels.to_vec::<i64>().unwrap()[0], 0);
        assert_eq!(d.labels.eq(8i64).unwrap().sum_all().unwrap().to_scalar::<i64>().unwrap(), 174);
        assert_eq!(d.images.max_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
        let (train, test) = d.split(0.2, 0).unwrap();
        assert_eq!((train.len(), test.len()), (1438, 359));
    }

    #[test]
    fn malformed_files_are_clear_errors() {
        let gz = |text: &str| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, text.as_bytes()).unwrap();
            e.finish().unwrap()
        };
        let err = parse(b"not gzip", "x").err().unwrap().to_string();
        assert!(err.starts_with("x: not a gzip'd text file"), "{err}");
        let err = parse(&gz("1,2,3\n"), "x").err().unwrap().to_string();
        assert_eq!(err, "x: line 1: 3 values, expected 65 (64 pixels and a label)");
        let row = format!("{}17", "0,".repeat(64));
        assert!(parse(&gz(&row), "x").err().unwrap().to_string().contains("17 is above 9"));
    }
}
