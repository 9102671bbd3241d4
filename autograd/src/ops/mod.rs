//! Differentiable ops on [`Var`]: each computes its forward with the tensor
//! op of the same name and records one backward rule, written with `Var` ops so that it
//! can be differentiated again. One file per family, mirroring `aigc_tensor::ops`.

pub mod arith;
pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gather;
pub mod index;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod recurrent;
pub mod reduce;
pub mod softmax;
pub mod view;

use crate::Var;
use aigc_tensor::{Result, Tensor};

impl Var {
    /// Records a one-input op whose input gradient is `rule(out, grad_out, x)`.
    pub fn unary_op(
        &self,
        op: &'static str,
        value: Tensor,
        rule: impl Fn(&Var, &Var, &Var) -> Result<Var> + Send + Sync + 'static,
    ) -> Result<Var> {
        Var::from_op(op, value, vec![self.clone()], Box::new(move |out, g, xs| Ok(vec![Some(rule(out, g, &xs[0])?)])))
    }

    /// Records a two-input op whose input gradients are `rule(out, grad_out, a, b)`.
    pub fn binary_op(
        &self,
        rhs: &Var,
        op: &'static str,
        value: Tensor,
        rule: impl Fn(&Var, &Var, &Var, &Var) -> Result<(Var, Var)> + Send + Sync + 'static,
    ) -> Result<Var> {
        Var::from_op(
            op,
            value,
            vec![self.clone(), rhs.clone()],
            Box::new(move |out, g, xs| {
                let (ga, gb) = rule(out, g, &xs[0], &xs[1])?;
                Ok(vec![Some(ga), Some(gb)])
            }),
        )
    }

    /// A constant of zeros shaped like this var.
    pub fn zeros_like(&self) -> Result<Var> {
        Ok(Var::constant(self.value().zeros_like()?))
    }
}
