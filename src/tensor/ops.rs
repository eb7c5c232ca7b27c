//! The op list. Each op checks shapes here, once, then dispatches to the backend that
//! holds the data. Model code only ever calls these methods.

use super::params::{AttentionParams, Conv2dParams, MatmulDims, Padding2d};
use super::{interrupt, profile, DType, Device, Storage, Tensor};
use crate::backend::cpu::{self, CpuStorage};
use crate::backend::gpu;
use crate::error::{Error, Result};

/// Elementwise binary ops (numpy-style broadcasting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// Elementwise unary ops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    Silu,
    /// The exact (erf) GELU, torch's default.
    Gelu,
    /// x * sigmoid(1.702 x), CLIP's activation.
    QuickGelu,
    /// a * x + b.
    Affine {
        mul: f32,
        add: f32,
    },
    Clamp {
        min: f32,
        max: f32,
    },
    Sqrt,
    Exp,
}

/// Shape of `lhs op rhs` under numpy broadcasting.
fn broadcast_shape(lhs: &[usize], rhs: &[usize]) -> Result<Vec<usize>> {
    let rank = lhs.len().max(rhs.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let l = if i + lhs.len() >= rank {
            lhs[i + lhs.len() - rank]
        } else {
            1
        };
        let r = if i + rhs.len() >= rank {
            rhs[i + rhs.len() - rank]
        } else {
            1
        };
        out[i] = match (l, r) {
            (a, b) if a == b => a,
            (1, b) => b,
            (a, 1) => a,
            _ => {
                return Err(Error::shape(
                    "broadcast",
                    format!("shapes {lhs:?} and {rhs:?} do not broadcast"),
                ))
            }
        };
    }
    Ok(out)
}

/// Where every op starts: stops with `Error::Cancelled` once the job it runs for is
/// cancelled (see [`interrupt`]), and times the op when profiling.
fn begin(op: &'static str) -> Result<profile::Scope> {
    interrupt::check()?;
    Ok(profile::scope(op))
}

/// Operands on two devices: the model code moved one tensor and not the other.
fn mixed_devices(op: &'static str) -> Error {
    Error::shape(op, "operands live on different devices")
}

impl Tensor {
    fn same_device(&self, other: &Tensor, op: &'static str) -> Result<()> {
        if self.device() != other.device() {
            return Err(Error::shape(
                op,
                format!("tensors on {} and {}", self.device(), other.device()),
            ));
        }
        Ok(())
    }

    // ---- elementwise ----------------------------------------------------------------

    pub fn binary(&self, rhs: &Tensor, op: BinaryOp) -> Result<Tensor> {
        let _p = begin(match op {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
        })?;
        self.same_device(rhs, "binary")?;
        let shape = broadcast_shape(&self.shape, &rhs.shape)?;
        match (self.storage(), rhs.storage()) {
            (Storage::Cpu(a), Storage::Cpu(b)) => {
                let out = cpu::elementwise::binary(a, &self.shape, b, &rhs.shape, &shape, op);
                Ok(Tensor::from_storage(Storage::Cpu(out), shape))
            }
            (Storage::Gpu(a), Storage::Gpu(b)) => {
                let out = gpu::elementwise::binary(a, &self.shape, b, &rhs.shape, &shape, op)?;
                Ok(Tensor::from_storage(Storage::Gpu(out), shape))
            }
            _ => Err(mixed_devices("binary")),
        }
    }

    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Add)
    }

    /// `self + rhs` where `rhs` broadcasts to `self`'s shape, written over `self`'s memory
    /// when nothing else holds it (CPU; elsewhere, and for a shared `self`, as [`Tensor::add`]).
    /// For residual sums over large maps, where a third buffer is what sets peak memory.
    pub fn add_owned(self, rhs: &Tensor) -> Result<Tensor> {
        if broadcast_shape(&self.shape, &rhs.shape)? != self.shape {
            return Err(Error::shape(
                "add",
                format!("{:?} does not broadcast into {:?}", rhs.shape, self.shape),
            ));
        }
        match (self.into_unique_host_f32(), rhs.storage()) {
            (Ok((mut data, shape)), Storage::Cpu(b)) => {
                let _p = begin("add")?;
                cpu::elementwise::binary_assign(&mut data, &shape, b, &rhs.shape, BinaryOp::Add);
                Ok(Tensor::from_storage(
                    Storage::Cpu(CpuStorage::F32(data)),
                    shape,
                ))
            }
            (Ok(_), _) => Err(mixed_devices("add")),
            (Err(lhs), _) => lhs.add(rhs),
        }
    }

    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Sub)
    }

    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Mul)
    }

    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(rhs, BinaryOp::Div)
    }

    pub fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        let _p = begin(match op {
            UnaryOp::Silu => "silu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::QuickGelu => "quick_gelu",
            UnaryOp::Affine { .. } => "affine",
            UnaryOp::Clamp { .. } => "clamp",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Exp => "exp",
        })?;
        match self.storage() {
            Storage::Cpu(a) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::elementwise::unary(a, op)),
                self.shape.clone(),
            )),
            Storage::Gpu(a) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::elementwise::unary(a, op)?),
                self.shape.clone(),
            )),
        }
    }

    pub fn silu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Silu)
    }

    pub fn gelu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Gelu)
    }

    pub fn quick_gelu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::QuickGelu)
    }

    /// `mul * self + add`.
    pub fn affine(&self, mul: f32, add: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Affine { mul, add })
    }

    pub fn scale(&self, mul: f32) -> Result<Tensor> {
        self.affine(mul, 0.0)
    }

    pub fn clamp(&self, min: f32, max: f32) -> Result<Tensor> {
        self.unary(UnaryOp::Clamp { min, max })
    }

    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqrt)
    }

    pub fn exp(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Exp)
    }

    /// `a * x + b * y` for two tensors of one shape: the workhorse of scheduler updates.
    pub fn axpby(a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
        let _p = begin("axpby")?;
        x.same_device(y, "axpby")?;
        if x.shape != y.shape {
            return Err(Error::shape(
                "axpby",
                format!("shapes {:?} and {:?} differ", x.shape, y.shape),
            ));
        }
        match (x.storage(), y.storage()) {
            (Storage::Cpu(xs), Storage::Cpu(ys)) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::elementwise::axpby(a, xs, b, ys)),
                x.shape.clone(),
            )),
            (Storage::Gpu(xs), Storage::Gpu(ys)) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::elementwise::axpby(a, xs, b, ys)?),
                x.shape.clone(),
            )),
            _ => Err(mixed_devices("axpby")),
        }
    }

    /// GEGLU: splits the last dimension into halves `[h, gate]` and returns `h * gelu(gate)`.
    pub fn geglu(&self) -> Result<Tensor> {
        let _p = begin("geglu")?;
        let last = *self.shape.last().unwrap_or(&0);
        if !last.is_multiple_of(2) {
            return Err(Error::shape(
                "geglu",
                format!("last dimension of {:?} is odd", self.shape),
            ));
        }
        let mut shape = self.shape.clone();
        *shape.last_mut().expect("checked non-empty above") = last / 2;
        match self.storage() {
            Storage::Cpu(a) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::elementwise::geglu(a, last / 2)),
                shape,
            )),
            Storage::Gpu(a) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::elementwise::geglu(a, last / 2)?),
                shape,
            )),
        }
    }

    // ---- linear algebra -------------------------------------------------------------

    /// `self @ rhs` with self `[.., M, K]` and rhs `[.., K, N]` (same batch dims) or `[K, N]`.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.matmul_impl(rhs, false)
    }

    /// `self @ rhs^T` with rhs `[.., N, K]` or `[N, K]`.
    pub fn matmul_t(&self, rhs: &Tensor) -> Result<Tensor> {
        self.matmul_impl(rhs, true)
    }

    fn matmul_impl(&self, rhs: &Tensor, transpose_rhs: bool) -> Result<Tensor> {
        let _p = begin("matmul")?;
        self.same_device(rhs, "matmul")?;
        if self.rank() < 2 || rhs.rank() < 2 {
            return Err(Error::shape(
                "matmul",
                format!(
                    "operands {:?} and {:?} need rank >= 2",
                    self.shape, rhs.shape
                ),
            ));
        }
        let (m, k) = (self.shape[self.rank() - 2], self.shape[self.rank() - 1]);
        let (rk, n) = if transpose_rhs {
            (rhs.shape[rhs.rank() - 1], rhs.shape[rhs.rank() - 2])
        } else {
            (rhs.shape[rhs.rank() - 2], rhs.shape[rhs.rank() - 1])
        };
        let batch_shape = &self.shape[..self.rank() - 2];
        let rhs_batch = &rhs.shape[..rhs.rank() - 2];
        if rk != k || !(rhs_batch.is_empty() || rhs_batch == batch_shape) {
            return Err(Error::shape(
                "matmul",
                format!(
                    "cannot multiply {:?} by {:?}{}",
                    self.shape,
                    rhs.shape,
                    if transpose_rhs { "^T" } else { "" }
                ),
            ));
        }
        let batch: usize = batch_shape.iter().product();
        let mut shape = batch_shape.to_vec();
        shape.extend([m, n]);
        let dims = MatmulDims {
            batch,
            m,
            n,
            k,
            rhs_batched: !rhs_batch.is_empty(),
            transpose_rhs,
        };
        match (self.storage(), rhs.storage()) {
            (Storage::Cpu(a), Storage::Cpu(b)) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::matmul::matmul(a, b, None, dims)),
                shape,
            )),
            (Storage::Gpu(a), Storage::Gpu(b)) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::matmul::matmul(a, b, None, dims)?),
                shape,
            )),
            _ => Err(mixed_devices("matmul")),
        }
    }

    /// A fully connected layer as torch's `nn.Linear`: `self @ weight^T + bias`,
    /// self `[.., in]`, weight `[out, in]`, bias `[out]`.
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let _p = begin(if weight.dtype() == DType::F32 {
            "linear"
        } else {
            "linear (f16/bf16 weight)"
        })?;
        weight.expect_rank("linear", 2)?;
        let (out_f, in_f) = (weight.shape[0], weight.shape[1]);
        if self.shape.last() != Some(&in_f) {
            return Err(Error::shape(
                "linear",
                format!("input {:?} does not end in {in_f}", self.shape),
            ));
        }
        if let Some(b) = bias {
            b.expect_shape("linear bias", &[out_f])?;
        }
        let m = self.numel() / in_f.max(1);
        let mut shape = self.shape.clone();
        *shape.last_mut().expect("rank >= 1 checked above") = out_f;
        let dims = MatmulDims {
            batch: 1,
            m,
            n: out_f,
            k: in_f,
            rhs_batched: false,
            transpose_rhs: true,
        };
        match (self.storage(), weight.storage(), bias.map(|b| b.storage())) {
            (Storage::Cpu(x), Storage::Cpu(w), None) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::matmul::matmul(x, w, None, dims)),
                shape,
            )),
            (Storage::Cpu(x), Storage::Cpu(w), Some(Storage::Cpu(b))) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::matmul::matmul(x, w, Some(b), dims)),
                shape,
            )),
            (Storage::Gpu(x), Storage::Gpu(w), None) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::matmul::matmul(x, w, None, dims)?),
                shape,
            )),
            (Storage::Gpu(x), Storage::Gpu(w), Some(Storage::Gpu(b))) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::matmul::matmul(x, w, Some(b), dims)?),
                shape,
            )),
            _ => Err(mixed_devices("linear")),
        }
    }

    /// 2-D convolution as torch's `nn.Conv2d` (NCHW input, OIHW weight).
    pub fn conv2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Tensor> {
        self.conv2d_padded(weight, bias, stride, Padding2d::uniform(padding))
    }

    /// [`Tensor::conv2d`] with its own zero padding on each side.
    pub fn conv2d_padded(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: Padding2d,
    ) -> Result<Tensor> {
        let _p = begin(match (weight.shape.get(2), weight.dtype() == DType::F32) {
            (Some(1), true) => "conv2d 1x1",
            (Some(1), false) => "conv2d 1x1 (f16/bf16 weight)",
            (Some(3), true) => "conv2d 3x3",
            (Some(3), false) => "conv2d 3x3 (f16/bf16 weight)",
            (_, true) => "conv2d other",
            (_, false) => "conv2d other (f16/bf16 weight)",
        })?;
        self.expect_rank("conv2d", 4)?;
        weight.expect_rank("conv2d weight", 4)?;
        let [n, c, h, w] = [self.shape[0], self.shape[1], self.shape[2], self.shape[3]];
        let [oc, ic, kh, kw] = [
            weight.shape[0],
            weight.shape[1],
            weight.shape[2],
            weight.shape[3],
        ];
        let (padded_h, padded_w) = (
            h + padding.top + padding.bottom,
            w + padding.left + padding.right,
        );
        if ic != c || stride == 0 || padded_h < kh || padded_w < kw {
            return Err(Error::shape(
                "conv2d",
                format!(
                    "input {:?}, weight {:?}, stride {stride}, padding {padding:?}",
                    self.shape, weight.shape
                ),
            ));
        }
        if let Some(b) = bias {
            b.expect_shape("conv2d bias", &[oc])?;
        }
        let oh = (padded_h - kh) / stride + 1;
        let ow = (padded_w - kw) / stride + 1;
        let p = Conv2dParams {
            n,
            c,
            h,
            w,
            oc,
            kh,
            kw,
            stride,
            pad_top: padding.top,
            pad_left: padding.left,
            oh,
            ow,
        };
        match (self.storage(), weight.storage(), bias.map(|b| b.storage())) {
            (Storage::Cpu(x), Storage::Cpu(wt), bias @ (None | Some(Storage::Cpu(_)))) => {
                let bias = match bias {
                    Some(Storage::Cpu(b)) => Some(b),
                    _ => None,
                };
                let out = cpu::conv::conv2d(x, wt, bias, &p);
                // Large convolutions stop between chunks when cancelled.
                interrupt::check()?;
                Ok(Tensor::from_storage(Storage::Cpu(out), vec![n, oc, oh, ow]))
            }
            (Storage::Gpu(x), Storage::Gpu(wt), None) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::conv::conv2d(x, wt, None, &p)?),
                vec![n, oc, oh, ow],
            )),
            (Storage::Gpu(x), Storage::Gpu(wt), Some(Storage::Gpu(b))) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::conv::conv2d(x, wt, Some(b), &p)?),
                vec![n, oc, oh, ow],
            )),
            _ => Err(mixed_devices("conv2d")),
        }
    }

    // ---- normalisation ---------------------------------------------------------------

    /// Group norm over `[N, C, ...]` as torch's `nn.GroupNorm`, optionally followed by SiLU
    /// (fused because every ResNet block applies one right after the other).
    ///
    /// Takes `self` so that, on the CPU, a tensor nothing else holds is normalised in place.
    pub fn group_norm(
        self,
        num_groups: usize,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        silu: bool,
    ) -> Result<Tensor> {
        let _p = begin("group_norm")?;
        let [n, c, spatial] = self.group_layout("group_norm", num_groups)?;
        gamma.expect_shape("group_norm weight", &[c])?;
        beta.expect_shape("group_norm bias", &[c])?;
        let this = match (self.into_unique_host_f32(), gamma.storage(), beta.storage()) {
            (Ok((mut data, shape)), Storage::Cpu(g), Storage::Cpu(b)) => {
                cpu::norm::group_norm_in_place(&mut data, g, b, c, spatial, num_groups, eps, silu);
                return Ok(Tensor::from_storage(
                    Storage::Cpu(CpuStorage::F32(data)),
                    shape,
                ));
            }
            (Ok(_), _, _) => return Err(mixed_devices("group_norm")),
            (Err(this), _, _) => this,
        };
        let storage = match (this.storage(), gamma.storage(), beta.storage()) {
            (Storage::Cpu(x), Storage::Cpu(g), Storage::Cpu(b)) => Storage::Cpu(
                cpu::norm::group_norm(x, g, b, n, c, spatial, num_groups, eps, silu),
            ),
            (Storage::Gpu(x), Storage::Gpu(g), Storage::Gpu(b)) => Storage::Gpu(
                gpu::norm::group_norm(x, g, b, n, c, spatial, num_groups, eps, silu)?,
            ),
            _ => return Err(mixed_devices("group_norm")),
        };
        Ok(Tensor::from_storage(storage, this.shape.clone()))
    }

    /// The statistics a group norm uses: mean and biased variance of each (sample, group),
    /// `[N, num_groups, 2]`. With [`Tensor::group_norm_with_moments`] this normalises a
    /// tensor held in pieces (see `model::bands`).
    pub fn group_moments(&self, num_groups: usize) -> Result<Tensor> {
        let _p = begin("group_norm")?;
        let [n, c, spatial] = self.group_layout("group_moments", num_groups)?;
        let storage = match self.storage() {
            Storage::Cpu(x) => Storage::Cpu(cpu::norm::group_moments(x, n, c, spatial, num_groups)),
            Storage::Gpu(x) => {
                Storage::Gpu(gpu::norm::group_moments(x, n, c, spatial, num_groups)?)
            }
        };
        Ok(Tensor::from_storage(storage, vec![n, num_groups, 2]))
    }

    /// [`Tensor::group_norm`] with the given `[N, num_groups, 2]` means and variances.
    pub fn group_norm_with_moments(
        &self,
        num_groups: usize,
        moments: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        silu: bool,
    ) -> Result<Tensor> {
        let _p = begin("group_norm")?;
        let op = "group_norm_with_moments";
        let [n, c, spatial] = self.group_layout(op, num_groups)?;
        moments.expect_shape("group_norm moments", &[n, num_groups, 2])?;
        gamma.expect_shape("group_norm weight", &[c])?;
        beta.expect_shape("group_norm bias", &[c])?;
        let storage = match (
            self.storage(),
            moments.storage(),
            gamma.storage(),
            beta.storage(),
        ) {
            (Storage::Cpu(x), Storage::Cpu(m), Storage::Cpu(g), Storage::Cpu(b)) => {
                Storage::Cpu(cpu::norm::group_norm_with_moments(
                    x, m, g, b, n, c, spatial, num_groups, eps, silu,
                ))
            }
            (Storage::Gpu(x), Storage::Gpu(m), Storage::Gpu(g), Storage::Gpu(b)) => {
                Storage::Gpu(gpu::norm::group_norm_with_moments(
                    x, m, g, b, n, c, spatial, num_groups, eps, silu,
                )?)
            }
            _ => return Err(mixed_devices(op)),
        };
        Ok(Tensor::from_storage(storage, self.shape.clone()))
    }

    /// `[N, C, spatial]` of a tensor a group norm of `num_groups` groups can normalise.
    fn group_layout(&self, op: &'static str, num_groups: usize) -> Result<[usize; 3]> {
        if self.rank() < 2 || num_groups == 0 || !self.shape[1].is_multiple_of(num_groups) {
            return Err(Error::shape(
                op,
                format!("{:?} cannot be split into {num_groups} groups", self.shape),
            ));
        }
        Ok([
            self.shape[0],
            self.shape[1],
            self.shape[2..].iter().product(),
        ])
    }

    /// Layer norm over the last dimension as torch's `nn.LayerNorm`.
    pub fn layer_norm(&self, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        let _p = begin("layer_norm")?;
        let d = *self.shape.last().unwrap_or(&0);
        gamma.expect_shape("layer_norm weight", &[d])?;
        beta.expect_shape("layer_norm bias", &[d])?;
        match (self.storage(), gamma.storage(), beta.storage()) {
            (Storage::Cpu(x), Storage::Cpu(g), Storage::Cpu(b)) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::norm::layer_norm(x, g, b, d, eps)),
                self.shape.clone(),
            )),
            (Storage::Gpu(x), Storage::Gpu(g), Storage::Gpu(b)) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::norm::layer_norm(x, g, b, d, eps)?),
                self.shape.clone(),
            )),
            _ => Err(mixed_devices("layer_norm")),
        }
    }

    /// Softmax over the last dimension.
    pub fn softmax(&self) -> Result<Tensor> {
        let _p = begin("softmax")?;
        let d = *self.shape.last().unwrap_or(&0);
        match self.storage() {
            Storage::Cpu(x) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::attention::softmax(x, d)),
                self.shape.clone(),
            )),
            Storage::Gpu(x) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::attention::softmax(x, d)?),
                self.shape.clone(),
            )),
        }
    }

    // ---- attention -------------------------------------------------------------------

    /// Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v, per head.
    /// q is `[B, Lq, H*D]`, k and v `[B, Lk, H*D]`; the result is `[B, Lq, H*D]`, heads
    /// interleaved as torch's `view(B, L, H, D)` lays them out. With `causal`, query i only
    /// sees keys 0..=i. The full score matrix is never materialised.
    pub fn attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        causal: bool,
    ) -> Result<Tensor> {
        let _p = begin(if q.shape.get(1) == k.shape.get(1) {
            "attention (self)"
        } else {
            "attention (cross)"
        })?;
        q.same_device(k, "attention")?;
        q.same_device(v, "attention")?;
        q.expect_rank("attention q", 3)?;
        k.expect_rank("attention k", 3)?;
        let [b, lq, inner] = [q.shape[0], q.shape[1], q.shape[2]];
        let lk = k.shape[1];
        if heads == 0 || inner % heads != 0 || k.shape != [b, lk, inner] || v.shape != k.shape {
            return Err(Error::shape(
                "attention",
                format!(
                    "q {:?}, k {:?}, v {:?}, {heads} heads",
                    q.shape, k.shape, v.shape
                ),
            ));
        }
        let p = AttentionParams {
            batch: b,
            heads,
            q_len: lq,
            kv_len: lk,
            head_dim: inner / heads,
            causal,
        };
        match (q.storage(), k.storage(), v.storage()) {
            (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) => {
                let out = cpu::attention::attention(qs, ks, vs, &p);
                // It stops part-way when cancelled.
                interrupt::check()?;
                Ok(Tensor::from_storage(Storage::Cpu(out), q.shape.clone()))
            }
            (Storage::Gpu(qs), Storage::Gpu(ks), Storage::Gpu(vs)) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::attention::attention(qs, ks, vs, &p)?),
                q.shape.clone(),
            )),
            _ => Err(mixed_devices("attention")),
        }
    }

    // ---- layout ----------------------------------------------------------------------

    /// Axes reordered as torch's `permute(..).contiguous()`.
    pub fn permute(&self, axes: &[usize]) -> Result<Tensor> {
        let _p = begin("permute")?;
        let mut seen = vec![false; self.rank()];
        if axes.len() != self.rank()
            || axes
                .iter()
                .any(|&a| a >= seen.len() || std::mem::replace(&mut seen[a], true))
        {
            return Err(Error::shape(
                "permute",
                format!(
                    "{axes:?} is not a permutation of the axes of {:?}",
                    self.shape
                ),
            ));
        }
        let shape: Vec<usize> = axes.iter().map(|&a| self.shape[a]).collect();
        match self.storage() {
            Storage::Cpu(x) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::layout::permute(x, &self.shape, axes)),
                shape,
            )),
            Storage::Gpu(x) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::layout::permute(x, &self.shape, axes)?),
                shape,
            )),
        }
    }

    /// `len` entries of dimension `dim` starting at `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let _p = begin("narrow")?;
        if dim >= self.rank() || start + len > self.shape[dim] {
            return Err(Error::shape(
                "narrow",
                format!("{start}..{} of dim {dim} of {:?}", start + len, self.shape),
            ));
        }
        let mut shape = self.shape.clone();
        shape[dim] = len;
        match self.storage() {
            Storage::Cpu(x) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::layout::narrow(x, &self.shape, dim, start, len)),
                shape,
            )),
            Storage::Gpu(x) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::layout::narrow(x, &self.shape, dim, start, len)?),
                shape,
            )),
        }
    }

    /// Concatenation along `dim`; all other dimensions must agree.
    pub fn cat(tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
        let _p = begin("cat")?;
        let first = tensors
            .first()
            .ok_or_else(|| Error::shape("cat", "no tensors"))?;
        let mut shape = first.shape.clone();
        if dim >= shape.len() {
            return Err(Error::shape(
                "cat",
                format!("dim {dim} of {:?}", first.shape),
            ));
        }
        shape[dim] = 0;
        for t in tensors {
            first.same_device(t, "cat")?;
            let ok = t.rank() == first.rank()
                && (0..t.rank()).all(|d| d == dim || t.shape[d] == first.shape[d]);
            if !ok {
                return Err(Error::shape(
                    "cat",
                    format!("{:?} and {:?} along dim {dim}", first.shape, t.shape),
                ));
            }
            shape[dim] += t.shape[dim];
        }
        match first.device() {
            Device::Cpu => {
                let parts: Vec<(&cpu::CpuStorage, &[usize])> = tensors
                    .iter()
                    .map(|t| match t.storage() {
                        Storage::Cpu(s) => Ok((s, t.shape())),
                        Storage::Gpu(_) => Err(mixed_devices("cat")),
                    })
                    .collect::<Result<_>>()?;
                Ok(Tensor::from_storage(
                    Storage::Cpu(cpu::layout::cat(&parts, dim)),
                    shape,
                ))
            }
            Device::Gpu(_) => {
                let parts: Vec<(&gpu::GpuStorage, &[usize])> = tensors
                    .iter()
                    .map(|t| match t.storage() {
                        Storage::Gpu(s) => Ok((s, t.shape())),
                        Storage::Cpu(_) => Err(mixed_devices("cat")),
                    })
                    .collect::<Result<_>>()?;
                Ok(Tensor::from_storage(
                    Storage::Gpu(gpu::layout::cat(&parts, dim)?),
                    shape,
                ))
            }
        }
    }

    /// Nearest-neighbour resize of an NCHW tensor, as torch's `F.interpolate(mode="nearest")`.
    pub fn upsample_nearest(&self, out_h: usize, out_w: usize) -> Result<Tensor> {
        let _p = begin("upsample_nearest")?;
        self.expect_rank("upsample_nearest", 4)?;
        let [n, c, h, w] = [self.shape[0], self.shape[1], self.shape[2], self.shape[3]];
        match self.storage() {
            Storage::Cpu(x) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::layout::upsample_nearest(x, n * c, h, w, out_h, out_w)),
                vec![n, c, out_h, out_w],
            )),
            Storage::Gpu(x) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::layout::upsample_nearest(x, n * c, h, w, out_h, out_w)?),
                vec![n, c, out_h, out_w],
            )),
        }
    }

    /// Rows `ids` of a `[vocab, dim]` table: an embedding lookup.
    pub fn embedding(&self, ids: &[u32]) -> Result<Tensor> {
        let _p = begin("embedding")?;
        self.expect_rank("embedding", 2)?;
        let (rows, d) = (self.shape[0], self.shape[1]);
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= rows) {
            return Err(Error::shape(
                "embedding",
                format!("id {bad} is outside the table of {rows} rows"),
            ));
        }
        match self.storage() {
            Storage::Cpu(x) => Ok(Tensor::from_storage(
                Storage::Cpu(cpu::layout::gather_rows(x, d, ids)),
                vec![ids.len(), d],
            )),
            Storage::Gpu(x) => Ok(Tensor::from_storage(
                Storage::Gpu(gpu::layout::gather_rows(x, d, ids)?),
                vec![ids.len(), d],
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::broadcast_shape;
    use crate::tensor::testing::random;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast_shape(&[2, 3, 4], &[4]).unwrap(), vec![2, 3, 4]);
        assert_eq!(broadcast_shape(&[2, 1, 4], &[3, 1]).unwrap(), vec![2, 3, 4]);
        assert!(broadcast_shape(&[2, 3], &[4]).is_err());
    }

    /// A tensor nothing else holds is overwritten; a shared one is left alone; both give
    /// the same values as the allocating ops.
    #[test]
    fn owned_ops_reuse_a_unique_buffer_and_leave_shared_ones() {
        let x = random(&[2, 8, 5, 3], 1);
        let (gamma, beta) = (random(&[8], 2), random(&[8], 3));
        let before = x.to_vec().unwrap();
        let shared = x.clone().group_norm(4, &gamma, &beta, 1e-6, true).unwrap();
        assert_eq!(x.to_vec().unwrap(), before, "a shared input changed");
        let unique = x.group_norm(4, &gamma, &beta, 1e-6, true).unwrap();
        assert_eq!(shared.to_vec().unwrap(), unique.to_vec().unwrap());

        let kept = random(&[2, 8, 5, 3], 1);
        for rhs in [
            random(&[2, 8, 5, 3], 4),
            random(&[2, 8, 1, 1], 5),
            random(&[3], 6),
        ] {
            let expected = kept.add(&rhs).unwrap().to_vec().unwrap();
            let unique = random(&[2, 8, 5, 3], 1);
            assert_eq!(unique.add_owned(&rhs).unwrap().to_vec().unwrap(), expected);
            assert_eq!(
                kept.clone().add_owned(&rhs).unwrap().to_vec().unwrap(),
                expected
            );
            assert_eq!(kept.to_vec().unwrap(), before, "a shared input changed");
        }
        assert!(
            random(&[3], 7).add_owned(&kept).is_err(),
            "the sum must keep self's shape"
        );
    }
}
