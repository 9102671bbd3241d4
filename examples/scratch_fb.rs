use aigc::autograd::Var;
use aigc::tensor::{Conv2dParams, ConvTranspose2dParams};
use aigc::{Device, Tensor};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("conv");
    let threads: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let iters: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let mode = args.get(3).map(String::as_str).unwrap_or("fb");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let (xs, ws): ([usize; 4], [usize; 4]) =
            if which == "conv" { ([64, 32, 28, 28], [64, 32, 3, 3]) } else { ([64, 64, 14, 14], [64, 32, 4, 4]) };
        let x = Tensor::randn(&xs[..], &Device::Cpu, 1).unwrap();
        let w = Tensor::randn(&ws[..], &Device::Cpu, 2).unwrap();
        let (x, w) = (Var::leaf(x), Var::leaf(w));
        let run = || {
            let y = if which == "conv" {
                x.conv2d(&w, None, Conv2dParams { stride: [1, 1], padding: [1, 1], dilation: [1, 1], groups: 1 })
                    .unwrap()
            } else {
                x.conv_transpose2d(
                    &w,
                    None,
                    ConvTranspose2dParams {
                        stride: [2, 2],
                        padding: [1, 1],
                        output_padding: [0, 0],
                        dilation: [1, 1],
                        groups: 1,
                    },
                )
                .unwrap()
            };
            if mode == "fb" {
                y.sum_all().unwrap().backward().unwrap();
            }
        };
        run();
        let mut times = vec![];
        for _ in 0..iters {
            let t = Instant::now();
            run();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!("{which} {mode} threads {threads}: median {:.2} ms min {:.2}", times[iters / 2], times[0]);
    });
}
