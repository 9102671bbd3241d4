//! Softmax regression on the embedded 8x8 digits, written with tensor ops alone.
//!
//! The model is `p = softmax(X W + b)` and the loss the mean cross-entropy
//! `-1/N sum_i log p[i, y_i]`. Its gradient has the closed form
//! `dL/dW = X^T (p - Y) / N`, `dL/db = sum_i (p - Y)_i / N` (Y one-hot), so plain
//! gradient descent needs only matmul, softmax, one_hot and reductions. (With autograd
//! the gradient comes for free; this example shows the tensor layer on its own.)
//!
//! Run: `cargo run --release --example digits_softmax`

use aigc::trainers::data::digits::Digits;
use aigc::{DType, Device, Result, Tensor};
use std::process::ExitCode;

#[path = "common/mod.rs"]
mod common;

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

fn main() -> ExitCode {
    common::report(train_and_evaluate)
}

fn train_and_evaluate() -> Result<()> {
    common::expect_no_arguments("digits_softmax", "usage: digits_softmax (takes no flags)")?;
    let dev = Device::Cpu;
    let (train, test) = Digits::load()?.split(0.2, 0)?;
    let (x_train, y_train, x_test, y_test) = (&train.images, &train.labels, &test.images, &test.labels);
    let (n_train, n_test) = (train.len(), test.len());
    let y_onehot = y_train.one_hot(10, DType::F32)?;

    let mut w = Tensor::zeros([64, 10], DType::F32, &dev)?;
    let mut b = Tensor::zeros([10], DType::F32, &dev)?;
    let lr = 0.5;
    println!("softmax regression on {n_train} train / {n_test} test digits");
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
    println!("train accuracy {:.1}%", 100.0 * accuracy(x_train, &w, &b, y_train)?);
    println!("test accuracy  {:.1}%", 100.0 * accuracy(x_test, &w, &b, y_test)?);

    let predicted = x_test.matmul(&w)?.add(&b)?.argmax(-1, false)?.to_vec::<i64>()?;
    let truth = y_test.to_vec::<i64>()?;
    for i in 0..3 {
        let img = x_test.narrow(0, i, 1)?.to_vec::<f32>()?;
        println!("\n{}predicted {} (label {})", ascii_digit(&img), predicted[i], truth[i]);
    }
    Ok(())
}
