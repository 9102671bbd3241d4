//! A resumed run reproduces an uninterrupted one bit for bit: a small MLP with dropout,
//! trained with AdamW (no weight decay on biases), a warmup-cosine schedule and a
//! parameter EMA for 20 steps, against 10 steps, a checkpoint, everything dropped, a
//! model rebuilt from the checkpoint, and 10 more steps. The 20 losses, the final
//! weights and the EMA shadows must be equal as bits.

use aigc_autograd::Var;
use aigc_nn::checkpoint::Checkpoint;
use aigc_nn::optim::{AdamConfig, AdamW, Ema, LrSchedule, Optimizer, ParamGroup, WarmupCosine};
use aigc_nn::state_dict::state_dict;
use aigc_nn::{Linear, Module, VarStore, loss};
use aigc_tensor::{DType, Device, Result, Tensor};
use std::ops::Range;
use std::path::Path;

const STORE_SEED: u64 = 42;
const SCHEDULE: WarmupCosine = WarmupCosine { warmup: 4, total: 20, max_lr: 1e-2, min_lr: 1e-3 };
const CONFIG: &str = "model=mlp(4,32,1) dropout=0.25 optimizer=adamw(lr=1e-2, wd=0.1)";

/// `Linear -> ReLU -> Dropout -> Linear`, dropout seeded from the store.
struct Mlp {
    vs: VarStore,
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(vs: &VarStore) -> Mlp {
        Mlp {
            vs: vs.clone(),
            fc1: Linear::new(&vs.pp("fc1"), 4, 32).unwrap(),
            fc2: Linear::new(&vs.pp("fc2"), 32, 1).unwrap(),
        }
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Var) -> Result<Var> {
        let h = self.fc1.forward(x)?.relu()?;
        let h = if self.vs.is_training() { h.dropout(0.25, self.vs.next_seed())? } else { h };
        self.fc2.forward(&h)
    }
}

/// Everything a run holds.
struct Run {
    vs: VarStore,
    model: Mlp,
    opt: AdamW,
    ema: Ema,
    /// The data cursor, the caller's own state saved in the checkpoint.
    batches_seen: u64,
}

impl Run {
    fn new() -> Run {
        let vs = VarStore::new(DType::F32, &Device::Cpu, STORE_SEED);
        let model = Mlp::new(&vs);
        let cfg = AdamConfig { lr: SCHEDULE.max_lr, weight_decay: 0.1, ..Default::default() };
        let opt = AdamW::adamw(ParamGroup::no_decay_for_vectors(vs.named_parameters()), cfg).unwrap();
        let ema = Ema::new(vs.named_parameters(), 0.9).unwrap().with_warmup();
        Run { vs, model, opt, ema, batches_seen: 0 }
    }

    fn resume(path: &Path) -> Run {
        let mut run = Run::new();
        let checkpoint = Checkpoint::load(path).unwrap();
        checkpoint.restore(&run.vs, &mut run.opt).unwrap();
        run.ema.load_state(&checkpoint.extra("ema")).unwrap();
        assert_eq!(checkpoint.config, CONFIG);
        assert_eq!(checkpoint.step, 10);
        run.batches_seen = checkpoint.rng[0];
        run
    }

    fn save(&self, path: &Path, step: u64) {
        Checkpoint::capture(&self.vs, &self.opt, step)
            .with_rng(vec![self.batches_seen])
            .with_config(CONFIG)
            .with_extra("ema", self.ema.state())
            .save(path)
            .unwrap();
    }

    /// The training batch after `batches_seen` earlier ones: a fixed random regression.
    fn next_batch(&mut self) -> (Var, Var) {
        let seed = 1000 + self.batches_seen;
        self.batches_seen += 1;
        let x = Tensor::uniform([8, 4], -1.0, 1.0, DType::F32, &Device::Cpu, seed).unwrap();
        let y = x.sum(&[-1], true).unwrap().sin().unwrap();
        (Var::constant(x), Var::constant(y))
    }

    /// Trains `steps`, returning each step's loss as bits.
    fn train(&mut self, steps: Range<u64>) -> Vec<u32> {
        steps
            .map(|step| {
                self.opt.set_lr(SCHEDULE.lr(step));
                let (x, y) = self.next_batch();
                let loss = loss::mse(&self.model.forward(&x).unwrap(), &y).unwrap();
                self.opt.zero_grad();
                loss.backward().unwrap();
                self.opt.step().unwrap();
                self.ema.update().unwrap();
                loss.value().to_scalar::<f32>().unwrap().to_bits()
            })
            .collect()
    }

    /// The weights and the EMA shadows, as bits.
    fn final_bits(&self) -> Vec<Vec<u8>> {
        let weights = state_dict(&self.vs).into_iter().map(|(_, t)| t.to_le_bytes().unwrap());
        let shadows = self.ema.state().into_iter().map(|(_, t)| t.to_le_bytes().unwrap());
        weights.chain(shadows).collect()
    }
}

#[test]
fn a_resumed_run_reproduces_the_uninterrupted_losses_bit_for_bit() {
    let mut straight = Run::new();
    let expected = straight.train(0..20);

    let dir = std::env::temp_dir().join(format!("aigc-checkpoint-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("step10.safetensors");
    let mut first_half = Run::new();
    let mut losses = first_half.train(0..10);
    first_half.save(&path, 10);
    drop(first_half);

    let mut resumed = Run::resume(&path);
    losses.extend(resumed.train(10..20));
    std::fs::remove_dir_all(&dir).unwrap();

    assert_eq!(losses, expected, "losses as f32 bits: resumed vs uninterrupted");
    assert!(straight.final_bits() == resumed.final_bits(), "final weights and EMA differ");
    let first = f32::from_bits(expected[0]);
    let last = f32::from_bits(expected[19]);
    assert!(last < first, "the run should learn: loss {first} -> {last}");
}
