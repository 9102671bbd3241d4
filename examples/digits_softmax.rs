//! Softmax regression on the embedded 8x8 digits, written with tensor ops alone.
//!
//! The model is `p = softmax(X W + b)` and the loss the mean cross-entropy
//! `-1/N sum_i log p[i, y_i]`. Its gradient has the closed form
//! `dL/dW = X^T (p - Y) / N`, `dL/db = sum_i (p - Y)_i / N` (Y one-hot), so plain
//! gradient descent needs only matmul, softmax, one_hot and reductions. (With autograd
//! the gradient comes for free; this example shows the tensor layer on its own.)
//!
//! Run: `cargo run --release --example digits_softmax`

use aigc::{DType, Device, Result, Tensor};
use std::io::Read;

/// Reads `data/digits/digits.csv.gz`: 1797 rows of 64 pixels (0..16) and a label.
fn load_digits() -> std::result::Result<(Vec<f32>, Vec<i64>), Box<dyn std::error::Error>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits/digits.csv.gz");
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path)?).read_to_string(&mut text)?;
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for (line_no, line) in text.lines().enumerate() {
        let values: Vec<f32> =
            line.split(',').map(|v| v.trim().parse::<f32>()).collect::<std::result::Result<_, _>>()?;
        if values.len() != 65 {
            return Err(format!("{path}: line {} has {} values, expected 65", line_no + 1, values.len()).into());
        }
        pixels.extend(values[..64].iter().map(|p| p / 16.0));
        labels.push(values[64] as i64);
    }
    Ok((pixels, labels))
}

fn accuracy(x: &Tensor, w: &Tensor, b: &Tensor, y: &Tensor) -> Result<f32> {
    let predicted = x.matmul(w)?.add(b)?.argmax(-1, false)?;
    Ok(predicted.eq(y)?.sum_all()?.to_scalar::<i64>()? as f32 / y.numel() as f32)
}

fn ascii_digit(pixels: &[f32]) -> String {
    let shades = [' ', '.', ':', 'o', '#'];
    pixels
        .chunks(8)
        .map(|row| row.iter().map(|&p| shades[((p * 4.0).round() as usize).min(4)]).collect::<String>() + "\n")
        .collect()
}

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let (pixels, labels) = load_digits()?;
    let n = labels.len();
    let x_all = Tensor::from_vec(pixels, [n, 64], &dev)?;
    let y_all = Tensor::from_vec(labels, [n], &dev)?;

    // Shuffle once, then hold out the last 20% as the test set.
    let order = Tensor::randperm(n, &dev, 0)?;
    let (x_all, y_all) = (x_all.index_select(0, &order)?, y_all.index_select(0, &order)?);
    let n_train = n * 4 / 5;
    let (x_train, x_test) = (x_all.narrow(0, 0, n_train)?, x_all.narrow(0, n_train, n - n_train)?);
    let (y_train, y_test) = (y_all.narrow(0, 0, n_train)?, y_all.narrow(0, n_train, n - n_train)?);
    let y_onehot = y_train.one_hot(10, DType::F32)?;

    let mut w = Tensor::zeros([64, 10], DType::F32, &dev)?;
    let mut b = Tensor::zeros([10], DType::F32, &dev)?;
    let lr = 0.5;
    println!("softmax regression on {n_train} train / {} test digits", n - n_train);
    for step in 0..=400 {
        let logits = x_train.matmul(&w)?.add(&b)?;
        let log_p = logits.log_softmax(-1)?;
        if step % 50 == 0 {
            let loss = log_p.mul(&y_onehot)?.sum(&[-1], false)?.mean_all()?.neg()?;
            println!("step {step:4}  loss {:.4}", loss.to_scalar::<f32>()?);
        }
        let g = (log_p.exp()?.sub(&y_onehot)? / n_train as f64)?;
        w = w.sub(&(x_train.t()?.matmul(&g)? * lr)?)?;
        b = b.sub(&(g.sum(&[0], false)? * lr)?)?;
    }
    println!("train accuracy {:.1}%", 100.0 * accuracy(&x_train, &w, &b, &y_train)?);
    println!("test accuracy  {:.1}%", 100.0 * accuracy(&x_test, &w, &b, &y_test)?);

    let predicted = x_test.matmul(&w)?.add(&b)?.argmax(-1, false)?.to_vec::<i64>()?;
    let truth = y_test.to_vec::<i64>()?;
    for i in 0..3 {
        let img = x_test.narrow(0, i, 1)?.to_vec::<f32>()?;
        println!("\n{}predicted {} (label {})", ascii_digit(&img), predicted[i], truth[i]);
    }
    Ok(())
}
