//! An MLP classifier on the embedded 8x8 digits, trained with autograd and AdamW:
//! `64 -> 128 -> ReLU -> 10`, cross-entropy, minibatches of 64.
//!
//! Run: `cargo run --release --example digits_mlp`

use aigc::autograd::{Var, no_grad};
use aigc::nn::{AdamConfig, AdamW, Linear, Module, Optimizer, Sequential, VarStore, loss};
use aigc::trainers::data::digits::Digits;
use aigc::{DType, Device, Result, Tensor};
use std::process::ExitCode;
use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

fn accuracy(model: &Sequential, images: &Tensor, labels: &Tensor) -> Result<f64> {
    no_grad(|| {
        let predicted = model.forward(&Var::constant(images.clone()))?.value().argmax(-1, false)?;
        Ok(predicted.eq(labels)?.sum_all()?.to_scalar::<i64>()? as f64 / labels.numel() as f64)
    })
}

fn main() -> ExitCode {
    common::report(train_and_evaluate)
}

fn train_and_evaluate() -> Result<()> {
    common::expect_no_arguments("digits_mlp", "usage: digits_mlp (takes no flags)")?;
    let start = Instant::now();
    let dev = Device::Cpu;
    let (train, test) = Digits::load()?.split(0.2, 0)?;
    let vs = VarStore::new(DType::F32, &dev, 0);
    let model = Sequential::new().layer(Linear::new(&vs.pp("fc1"), 64, 128)?).then(|x| x.relu()).layer(Linear::new(
        &vs.pp("fc2"),
        128,
        10,
    )?);
    let mut opt =
        AdamW::adamw(vs.named_parameters(), AdamConfig { lr: 3e-3, weight_decay: 1e-4, ..Default::default() })?;
    println!("MLP with {} parameters on {} train / {} test digits", vs.num_parameters(), train.len(), test.len());

    let batch = 64;
    for epoch in 0..40 {
        let order = Tensor::randperm(train.len(), &dev, 1000 + epoch)?;
        let mut total = 0.0;
        for (i, start) in (0..train.len()).step_by(batch).enumerate() {
            let idx = order.narrow(0, start, batch.min(train.len() - start))?;
            let x = Var::constant(train.images.index_select(0, &idx)?);
            let y = train.labels.index_select(0, &idx)?;
            let loss = loss::cross_entropy(&model.forward(&x)?, &y)?;
            opt.zero_grad();
            loss.backward()?;
            opt.step()?;
            total = (total * i as f64 + loss.value().to_scalar::<f32>()? as f64) / (i + 1) as f64;
        }
        if epoch % 10 == 9 {
            println!(
                "epoch {:2}  train loss {total:.4}  test accuracy {:.1}%",
                epoch + 1,
                100.0 * accuracy(&model, &test.images, &test.labels)?
            );
        }
    }
    let acc = accuracy(&model, &test.images, &test.labels)?;
    println!("final test accuracy {:.1}% in {:.1} s", 100.0 * acc, start.elapsed().as_secs_f64());
    Ok(())
}
