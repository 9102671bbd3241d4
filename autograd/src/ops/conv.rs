//! Differentiable convolutions: `conv1d`, `conv2d`, `conv_transpose1d`, `conv_transpose2d`
//! (PyTorch semantics, see `aigc_tensor::ops::conv`).
//!
//! A convolution `y = conv(x, w) + b` is linear in `x` and in `w`, so each gradient is the
//! adjoint of a linear map applied to `g = dL/dy`:
//!
//! - **input**: the adjoint of a convolution is the transposed convolution with the same
//!   weight and hyper-parameters, `dx = conv_transpose(g, w)`, with the output padding that
//!   gives `x`'s size exactly. Conversely the input gradient of a transposed convolution is
//!   the convolution `dx = conv(g, w)`, cropped to `x`'s size.
//! - **weight**: `dw[co, ci, ky, kx] = sum_{n, oy, ox} g[n, co, oy, ox] *
//!   x[n, ci, oy*s + ky*d - p, ox*s + kx*d - p]`, a correlation of the image with the
//!   feature gradient (`Tensor::conv2d_weight_grad`: one GEMM per batch entry on the
//!   forward's im2col columns). For a transposed convolution the image is `g` and the
//!   features are `x`. It is recorded as an op of its own, linear in both operands: for a
//!   weight-shaped gradient `h`, `<dw, h> = <conv2d(x, h), g>`, so its gradients are the
//!   adjoint `conv_transpose(g, h)` (for the image) and `conv2d(x, h)` (for the features).
//! - **bias**: the sum of `g` over batch and spatial dims.
//!
//! Every gradient is built from these same `Var` ops, so gradients of any order exist.
//! A 1-d convolution is differentiated as the 2-d one of height 1.

use crate::Var;
use aigc_tensor::{Conv1dParams, Conv2dParams, ConvTranspose1dParams, ConvTranspose2dParams, Result, Tensor};

/// Which way a recorded convolution maps: image to features, or features back to image.
#[derive(Clone, Copy, Debug)]
enum Direction {
    Forward,
    Transposed,
}

/// What a recorded convolution needs to differentiate itself.
#[derive(Clone, Copy, Debug)]
struct Recorded {
    direction: Direction,
    /// 2-d hyper-parameters of the forward convolution (for a transposed one, of the
    /// convolution it is the adjoint of).
    params: Conv2dParams,
    /// Whether the operands are 1-d, differentiated as 2-d with height 1.
    one_d: bool,
}

impl Var {
    /// 2-d convolution of `[N, C_in, H, W]` with a weight `[C_out, C_in / groups, kH, kW]`
    /// and an optional bias `[C_out]` (see [`aigc_tensor::Tensor::conv2d`]).
    pub fn conv2d(&self, weight: &Var, bias: Option<&Var>, params: Conv2dParams) -> Result<Var> {
        let value = self.value().conv2d(weight.value(), bias.map(Var::value), params)?;
        let recorded = Recorded { direction: Direction::Forward, params, one_d: false };
        recorded.record("conv2d", value, self, weight, bias)
    }

    /// 1-d convolution of `[N, C_in, L]` with a weight `[C_out, C_in / groups, k]` and an
    /// optional bias `[C_out]` (see [`aigc_tensor::Tensor::conv1d`]).
    pub fn conv1d(&self, weight: &Var, bias: Option<&Var>, params: Conv1dParams) -> Result<Var> {
        let value = self.value().conv1d(weight.value(), bias.map(Var::value), params)?;
        let params = Conv2dParams {
            stride: [1, params.stride[0]],
            padding: [0, params.padding[0]],
            dilation: [1, params.dilation[0]],
            groups: params.groups,
        };
        let recorded = Recorded { direction: Direction::Forward, params, one_d: true };
        recorded.record("conv1d", value, self, weight, bias)
    }

    /// 2-d transposed convolution of `[N, C_in, H, W]` with a weight
    /// `[C_in, C_out / groups, kH, kW]` and an optional bias `[C_out]` (see
    /// [`aigc_tensor::Tensor::conv_transpose2d`]).
    pub fn conv_transpose2d(&self, weight: &Var, bias: Option<&Var>, params: ConvTranspose2dParams) -> Result<Var> {
        let value = self.value().conv_transpose2d(weight.value(), bias.map(Var::value), params)?;
        let params = Conv2dParams {
            stride: params.stride,
            padding: params.padding,
            dilation: params.dilation,
            groups: params.groups,
        };
        let recorded = Recorded { direction: Direction::Transposed, params, one_d: false };
        recorded.record("conv_transpose2d", value, self, weight, bias)
    }

    /// 1-d transposed convolution of `[N, C_in, L]` with a weight `[C_in, C_out / groups, k]`
    /// and an optional bias `[C_out]` (see [`aigc_tensor::Tensor::conv_transpose1d`]).
    pub fn conv_transpose1d(&self, weight: &Var, bias: Option<&Var>, params: ConvTranspose1dParams) -> Result<Var> {
        let value = self.value().conv_transpose1d(weight.value(), bias.map(Var::value), params)?;
        let params = Conv2dParams {
            stride: [1, params.stride[0]],
            padding: [0, params.padding[0]],
            dilation: [1, params.dilation[0]],
            groups: params.groups,
        };
        let recorded = Recorded { direction: Direction::Transposed, params, one_d: true };
        recorded.record("conv_transpose1d", value, self, weight, bias)
    }
}

impl Recorded {
    /// Records the op `value = op(input, weight, bias)` with this convolution's rule.
    fn record(self, op: &'static str, value: Tensor, input: &Var, weight: &Var, bias: Option<&Var>) -> Result<Var> {
        let mut inputs = vec![input.clone(), weight.clone()];
        inputs.extend(bias.cloned());
        Var::from_op(op, value, inputs, Box::new(move |_, g, operands| self.backward(g, operands)))
    }

    /// Gradients of `[input, weight, bias?]`, each computed only when it is needed.
    fn backward(&self, g: &Var, operands: &[Var]) -> Result<Vec<Option<Var>>> {
        let lift = |v: &Var| if self.one_d { v.unsqueeze(2) } else { Ok(v.clone()) };
        let lower = |v: Var| if self.one_d { v.squeeze(2) } else { Ok(v) };
        // Both gradients' kernels read `g` row-major: one copy of a strided or broadcast
        // gradient (that of a `sum`) instead of one in each.
        let (g, x, w) = (lift(g)?.contiguous()?, lift(&operands[0])?, lift(&operands[1])?);
        let (image, features) = match self.direction {
            Direction::Forward => (&x, &g),
            Direction::Transposed => (&g, &x),
        };
        let dx = if operands[0].needs_grad() { Some(lower(self.input_grad(&g, &w, &x.dims()[2..])?)?) } else { None };
        let dw = if operands[1].needs_grad() {
            Some(lower(weight_grad(image, features, &w.dims()[2..], self.params)?)?)
        } else {
            None
        };
        let db = match operands.get(2) {
            Some(b) if b.needs_grad() => Some(g.sum(&[0, 2, 3], false)?),
            _ => None,
        };
        Ok(vec![dx, dw, db].into_iter().take(operands.len()).collect())
    }

    /// The input gradient: the adjoint map applied to `g`, sized like the input.
    fn input_grad(&self, g: &Var, w: &Var, input_size: &[usize]) -> Result<Var> {
        match self.direction {
            Direction::Forward => conv2d_adjoint(g, w, input_size, self.params),
            Direction::Transposed => crop(&g.conv2d(w, None, self.params)?, input_size),
        }
    }
}

/// The adjoint of `conv2d(., w, params)` applied to features `g`, as an image of spatial
/// size `image_size`: a transposed convolution whose output padding
/// `image + 2p - ((features - 1) s + d (k - 1) + 1)` restores the rows the convolution's
/// stride skipped (it is below the stride, so always valid).
pub(crate) fn conv2d_adjoint(g: &Var, w: &Var, image_size: &[usize], params: Conv2dParams) -> Result<Var> {
    let (features, kernel) = (&g.dims()[2..], &w.dims()[2..]);
    let output_padding: [usize; 2] = std::array::from_fn(|i| {
        let covered = (features[i] - 1) * params.stride[i] + params.dilation[i] * (kernel[i] - 1) + 1;
        image_size[i] + 2 * params.padding[i] - covered
    });
    let transposed = ConvTranspose2dParams {
        stride: params.stride,
        padding: params.padding,
        output_padding,
        dilation: params.dilation,
        groups: params.groups,
    };
    g.conv_transpose2d(w, None, transposed)
}

/// The gradient of `<conv2d(image, w, params), features>` with respect to `w`, whose
/// spatial size is `kernel` (see the module doc), recorded so that it can be
/// differentiated again.
fn weight_grad(image: &Var, features: &Var, kernel: &[usize], params: Conv2dParams) -> Result<Var> {
    let value = image.value().conv2d_weight_grad(features.value(), [kernel[0], kernel[1]], params)?;
    let image_size = image.dims()[2..].to_vec();
    image.binary_op(features, "conv2d_weight_grad", value, move |_, h, image, features| {
        Ok((conv2d_adjoint(features, h, &image_size, params)?, image.conv2d(h, None, params)?))
    })
}

/// The leading `size` window of the spatial dims (2 and 3) of `v`.
fn crop(v: &Var, size: &[usize]) -> Result<Var> {
    let mut out = v.clone();
    for (i, &len) in size.iter().enumerate() {
        if out.dims()[2 + i] != len {
            out = out.narrow(2 + i as isize, 0, len)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::Var;
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::testing::inputs;
    use aigc_tensor::{Conv1dParams, Conv2dParams, ConvTranspose1dParams, ConvTranspose2dParams, Result, Tensor};
    use proptest::prelude::*;

    /// One random convolution: direction, rank, sizes and hyper-parameters (per spatial
    /// dim; a 1-d case has height 1 and neutral height parameters).
    #[derive(Clone, Debug)]
    struct Case {
        one_d: bool,
        transposed: bool,
        batch: usize,
        groups: usize,
        in_per_group: usize,
        out_per_group: usize,
        size: [usize; 2],
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        output_padding: [usize; 2],
        bias: bool,
        /// Whether the input is a transposed (non-contiguous) view.
        strided_input: bool,
        seed: u64,
    }

    /// Sizes along one spatial dim: `(size, kernel, stride, padding, dilation, output_padding)`,
    /// adjusted so that the output of either direction is at least 1.
    fn axis(transposed: bool) -> impl Strategy<Value = [usize; 6]> {
        (1usize..=5, 1usize..=3, 1usize..=2, 0usize..=2, 1usize..=2, 0usize..2).prop_map(
            move |(raw, k, s, p, d, extra)| {
                let span = d * (k - 1) + 1;
                let output_padding = extra % s.max(d);
                if transposed {
                    let full = (raw - 1) * s + span + output_padding;
                    [raw, k, s, p.min((full - 1) / 2), d, output_padding]
                } else {
                    [raw.max(span.saturating_sub(2 * p)), k, s, p, d, 0]
                }
            },
        )
    }

    fn case() -> impl Strategy<Value = Case> {
        (any::<bool>(), any::<bool>()).prop_flat_map(|(one_d, transposed)| {
            let height = if one_d { Just([1, 1, 1, 0, 1, 0]).boxed() } else { axis(transposed).boxed() };
            (height, axis(transposed), 1usize..=2, 1usize..=2, 1usize..=2, 1usize..=2, any::<(bool, bool, u64)>())
                .prop_map(move |(hy, wx, batch, groups, in_per_group, out_per_group, (bias, strided_input, seed))| {
                    Case {
                        one_d,
                        transposed,
                        batch,
                        groups,
                        in_per_group,
                        out_per_group,
                        size: [hy[0], wx[0]],
                        kernel: [hy[1], wx[1]],
                        stride: [hy[2], wx[2]],
                        padding: [hy[3], wx[3]],
                        dilation: [hy[4], wx[4]],
                        output_padding: [hy[5], wx[5]],
                        bias,
                        strided_input,
                        seed,
                    }
                })
        })
    }

    impl Case {
        /// Drops the height of a 2-d shape for a 1-d case.
        fn shape(&self, dims: [usize; 4]) -> Vec<usize> {
            if self.one_d { vec![dims[0], dims[1], dims[3]] } else { dims.to_vec() }
        }
        /// The input `[N, C_in, H, W]`, laid out transposed in its last two dims if asked.
        fn input(&self) -> Tensor {
            let shape = self.shape([self.batch, self.groups * self.in_per_group, self.size[0], self.size[1]]);
            if !self.strided_input {
                return inputs::seeded(&shape, self.seed);
            }
            let rank = shape.len();
            let mut swapped = shape.clone();
            swapped.swap(rank - 2, rank - 1);
            inputs::seeded(&swapped, self.seed).transpose(-2, -1).unwrap()
        }
        /// Forward weight `[C_out, C_in / G, k..]`, transposed weight `[C_in, C_out / G, k..]`.
        fn weight(&self) -> Tensor {
            let (g, i, o) = (self.groups, self.in_per_group, self.out_per_group);
            let [a, b] = if self.transposed { [g * i, o] } else { [g * o, i] };
            inputs::seeded(&self.shape([a, b, self.kernel[0], self.kernel[1]]), self.seed ^ 1)
        }
        fn bias(&self) -> Tensor {
            inputs::seeded(&[self.groups * self.out_per_group], self.seed ^ 2)
        }
        /// The operands the op differentiates by: input, weight and (if any) bias.
        fn operands(&self) -> Vec<Tensor> {
            let mut all = vec![self.input(), self.weight()];
            all.extend(self.bias.then(|| self.bias()));
            all
        }
        /// The op applied to `[input, weight, bias?]`, as vars.
        fn apply(&self, v: &[Var]) -> Result<Var> {
            let (s, p, d, op, groups) = (self.stride, self.padding, self.dilation, self.output_padding, self.groups);
            let bias = v.get(2);
            match (self.one_d, self.transposed) {
                (false, false) => v[0].conv2d(&v[1], bias, Conv2dParams { stride: s, padding: p, dilation: d, groups }),
                (true, false) => {
                    let params = Conv1dParams { stride: [s[1]], padding: [p[1]], dilation: [d[1]], groups };
                    v[0].conv1d(&v[1], bias, params)
                }
                (false, true) => {
                    let params =
                        ConvTranspose2dParams { stride: s, padding: p, output_padding: op, dilation: d, groups };
                    v[0].conv_transpose2d(&v[1], bias, params)
                }
                (true, true) => {
                    let params = ConvTranspose1dParams {
                        stride: [s[1]],
                        padding: [p[1]],
                        output_padding: [op[1]],
                        dilation: [d[1]],
                        groups,
                    };
                    v[0].conv_transpose1d(&v[1], bias, params)
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn conv_grads_match_finite_differences_over_strides_paddings_dilations_groups(case in case()) {
            let operands = case.operands();
            gradcheck(|v| case.apply(v), &operands.iter().collect::<Vec<_>>(), &format!("{case:?}")).unwrap();
        }
    }

    #[test]
    fn conv_forward_values_equal_the_tensor_ops() {
        let leaf = |t: &Tensor| Var::leaf(t.clone());
        let same = |var: Var, tensor: Tensor| {
            assert_eq!(var.value().dims(), tensor.dims());
            assert_eq!(var.value().to_vec::<f64>().unwrap(), tensor.to_vec::<f64>().unwrap());
        };
        let b = inputs::seeded(&[6], 1);
        let x2 = inputs::seeded(&[2, 4, 5, 4], 2);
        let w2 = inputs::seeded(&[6, 2, 3, 2], 3);
        let p2 = Conv2dParams::default().stride(2).padding(1).dilation(2).groups(2);
        same(leaf(&x2).conv2d(&leaf(&w2), Some(&leaf(&b)), p2).unwrap(), x2.conv2d(&w2, Some(&b), p2).unwrap());
        let wt2 = inputs::seeded(&[4, 3, 3, 2], 4);
        let pt2 = ConvTranspose2dParams::default().stride(2).padding(1).output_padding(1).groups(2);
        let var = leaf(&x2).conv_transpose2d(&leaf(&wt2), Some(&leaf(&b)), pt2).unwrap();
        same(var, x2.conv_transpose2d(&wt2, Some(&b), pt2).unwrap());

        let x1 = inputs::seeded(&[2, 4, 5], 5);
        let w1 = inputs::seeded(&[6, 2, 3], 6);
        let p1 = Conv1dParams::default().stride(2).padding(1).groups(2);
        same(leaf(&x1).conv1d(&leaf(&w1), Some(&leaf(&b)), p1).unwrap(), x1.conv1d(&w1, Some(&b), p1).unwrap());
        let wt1 = inputs::seeded(&[4, 3, 2], 7);
        let pt1 = ConvTranspose1dParams::default().stride(3).dilation(2).output_padding(1).groups(2);
        let var = leaf(&x1).conv_transpose1d(&leaf(&wt1), Some(&leaf(&b)), pt1).unwrap();
        same(var, x1.conv_transpose1d(&wt1, Some(&b), pt1).unwrap());
    }

    #[test]
    fn conv2d_second_derivatives_match_finite_differences_with_groups_and_stride() {
        let x = inputs::seeded(&[1, 4, 5, 4], 5);
        let w = inputs::seeded(&[2, 2, 2, 3], 6);
        let b = inputs::seeded(&[2], 7);
        let params = Conv2dParams { stride: [2, 2], padding: [1, 1], dilation: [1, 2], groups: 2 };
        gradgradcheck(|v| v[0].conv2d(&v[1], Some(&v[2]), params), &[&x, &w, &b], "conv2d").unwrap();
        // A nonlinearity after the convolution makes the second derivative depend on the point.
        gradgradcheck(|v| v[0].conv2d(&v[1], None, params)?.tanh(), &[&x, &w], "tanh(conv2d)").unwrap();
    }

    #[test]
    fn conv_transpose2d_second_derivatives_match_finite_differences_with_output_padding() {
        let x = inputs::seeded(&[1, 2, 3, 2], 8);
        let w = inputs::seeded(&[2, 2, 2, 3], 9);
        let b = inputs::seeded(&[4], 10);
        let params = ConvTranspose2dParams {
            stride: [2, 3],
            padding: [1, 0],
            output_padding: [1, 2],
            dilation: [1, 2],
            groups: 2,
        };
        gradgradcheck(|v| v[0].conv_transpose2d(&v[1], Some(&v[2]), params)?.tanh(), &[&x, &w, &b], "conv_transpose2d")
            .unwrap();
    }

    #[test]
    fn conv1d_and_conv_transpose1d_second_derivatives_match_finite_differences() {
        let x = inputs::seeded(&[2, 2, 5], 11);
        let w = inputs::seeded(&[2, 1, 3], 12);
        let conv = Conv1dParams::default().stride(2).padding(1).groups(2);
        gradgradcheck(|v| v[0].conv1d(&v[1], None, conv)?.tanh(), &[&x, &w], "conv1d").unwrap();
        let transposed = ConvTranspose1dParams::default().stride(2).dilation(2).output_padding(1);
        gradgradcheck(|v| v[0].conv_transpose1d(&v[1], None, transposed)?.tanh(), &[&x, &w], "conv_transpose1d")
            .unwrap();
    }

    #[test]
    fn weight_gradient_of_a_sum_with_a_constant_input_is_each_taps_window_sum() {
        let x = Var::constant(inputs::seeded(&[1, 2, 4, 4], 13));
        let w = Var::leaf(inputs::seeded(&[3, 2, 3, 3], 14));
        x.conv2d(&w, None, Conv2dParams::default().padding(1)).unwrap().sum_all().unwrap().backward().unwrap();
        // Tap (ky, kx) of every filter sees the 4x4 window of the padded input starting there.
        let ones = Tensor::ones([1, 1, 4, 4], x.dtype(), &x.device()).unwrap();
        let windows = x.value().transpose(0, 1).unwrap().conv2d(&ones, None, Conv2dParams::default().padding(1));
        let expected = windows.unwrap().reshape([1, 2, 3, 3]).unwrap().broadcast_to([3, 2, 3, 3]).unwrap();
        let got = w.grad().unwrap().to_vec::<f64>().unwrap();
        for (a, b) in got.iter().zip(expected.contiguous().unwrap().to_vec::<f64>().unwrap()) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }
}
