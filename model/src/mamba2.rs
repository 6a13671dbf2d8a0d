//! The Mamba-2 mixer for full sequences: `in_proj` → [z | xBC | dt], causal depthwise conv + SiLU
//! on xBC, dt = clamp(softplus(dt + dt_bias)), A = -exp(A_log), the chunked SSD scan, D skip,
//! gated RMSNorm over `n_groups`, `out_proj`. Differentiable; the single-token recurrence used
//! for decoding lives in [`crate::engine`].

use candle_core::{D, Device, Tensor};

use crate::config::{MambaConfig, NemotronHConfig};
use crate::error::Result;
use crate::nn::{Linear, causal_depthwise_conv, gated_rms_norm, softplus};
use crate::params::ParamPath;

/// Mamba-2 weights of one block (`backbone.layers.N.mixer.*`).
#[derive(Clone, Debug)]
pub struct Mamba2 {
    cfg: MambaConfig,
    eps: f64,
    in_proj: Linear,
    conv_weight: Tensor,
    conv_bias: Option<Tensor>,
    dt_bias: Tensor,
    a_log: Tensor,
    d: Tensor,
    norm_weight: Tensor,
    out_proj: Linear,
}

/// The state a sequence carries between calls: the last `K-1` conv inputs and the SSM state.
#[derive(Clone, Debug)]
pub struct MambaState {
    /// `[B, K-1, conv_dim]`.
    pub conv: Tensor,
    /// `[B, heads, head_dim, state_size]`.
    pub ssm: Tensor,
}

impl Mamba2 {
    /// Builds the block from the tensors under `p` (`backbone.layers.N.mixer`).
    pub fn new(cfg: &NemotronHConfig, p: &ParamPath) -> Result<Self> {
        let m = cfg.mamba().clone();
        let d = cfg.hidden_size;
        let conv_weight = p
            .pp("conv1d")
            .get("weight", &[m.conv_dim(), 1, m.conv_kernel])?
            .squeeze(1)?;
        let conv_bias = if m.conv_bias {
            Some(p.pp("conv1d").get("bias", &[m.conv_dim()])?)
        } else {
            None
        };
        Ok(Self {
            in_proj: Linear::new(&p.pp("in_proj"), d, m.in_proj_dim())?,
            conv_weight,
            conv_bias,
            dt_bias: p.get("dt_bias", &[m.num_heads])?,
            a_log: p.get("A_log", &[m.num_heads])?,
            d: p.get("D", &[m.num_heads])?,
            norm_weight: p.pp("norm").get("weight", &[m.inner()])?,
            out_proj: Linear::new(&p.pp("out_proj"), m.inner(), d)?,
            eps: cfg.norm_eps,
            cfg: m,
        })
    }

    /// `x: [B, T, d]` from the zero state, returning `[B, T, d]`. In f32 on CPU everything
    /// between the two projections runs as one fused op (`fused::mamba_mixer`); the final
    /// state is not kept.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let proj = crate::fused::apply_linear(&self.in_proj, x)?;
        let params = crate::fused::MixerParams {
            conv_weight: &self.conv_weight,
            conv_bias: self.conv_bias.as_ref(),
            dt_bias: &self.dt_bias,
            a_log: &self.a_log,
            d: &self.d,
            norm_weight: &self.norm_weight,
        };
        match crate::fused::mamba_mixer(&proj, &params, &self.cfg, self.eps)? {
            Some(y) => crate::fused::apply_linear(&self.out_proj, &y),
            None => self.forward_layer_by_layer(x, &proj),
        }
    }

    /// [`Mamba2::forward`] after `in_proj` with each layer its own op (the fused ones where
    /// they apply): the path for other dtypes and devices, and the reference the fused mixer
    /// is tested against.
    fn forward_layer_by_layer(&self, x: &Tensor, proj: &Tensor) -> Result<Tensor> {
        let m = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let z = proj.narrow(D::Minus1, 0, m.inner())?;
        let xbc_in = proj.narrow(D::Minus1, m.inner(), m.conv_dim())?;
        let bias = match &self.conv_bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(m.conv_dim(), x.dtype(), x.device())?,
        };
        let xbc = match crate::fused::causal_conv_silu(&xbc_in, &self.conv_weight, &bias)? {
            Some(xbc) => xbc,
            None => causal_depthwise_conv(&xbc_in, &self.conv_weight, Some(&bias), None)?.silu()?,
        };
        let dt = self.dt(proj)?;
        let a = self.a_log.exp()?.neg()?;
        let Some(y) = crate::fused::ssd_scan(&xbc, &dt, &a, m)? else {
            return Ok(self.forward_with_state(x, None)?.0);
        };
        let xs = xbc
            .narrow(D::Minus1, 0, m.inner())?
            .reshape((b, t, m.num_heads, m.head_dim))?;
        self.finish(&y, &xs, &z)
    }

    /// `dt = clamp(softplus(dt + dt_bias))` from the `in_proj` output.
    fn dt(&self, proj: &Tensor) -> Result<Tensor> {
        let m = &self.cfg;
        let dt = proj.narrow(D::Minus1, m.inner() + m.conv_dim(), m.num_heads)?;
        let mut dt = softplus(&dt.broadcast_add(&self.dt_bias)?)?.maximum(m.dt_min)?;
        if m.dt_max.is_finite() {
            dt = dt.minimum(m.dt_max)?;
        }
        Ok(dt)
    }

    /// The scan's output `y: [B, T, H, P]` → D skip, gated RMSNorm, `out_proj`.
    fn finish(&self, y: &Tensor, xs: &Tensor, z: &Tensor) -> Result<Tensor> {
        let m = &self.cfg;
        let (b, t, _, _) = y.dims4()?;
        let y = y.reshape((b, t, m.inner()))?;
        let xs = xs.reshape((b, t, m.inner()))?;
        // D per head, as one scale per channel of the flattened heads.
        let d = self
            .d
            .unsqueeze(1)?
            .broadcast_as((m.num_heads, m.head_dim))?
            .flatten_all()?;
        let skip = match crate::fused::scale_channels(&xs, &d)? {
            Some(skip) => skip,
            None => xs.broadcast_mul(&d)?,
        };
        let y = (y + skip)?;
        let (group, eps) = (m.norm_group_size(), self.eps);
        let y = match crate::fused::gated_rms_norm(&y, z, &self.norm_weight, group, eps)? {
            Some(y) => y,
            None => gated_rms_norm(&y, z, &self.norm_weight, group, eps)?,
        };
        crate::fused::apply_linear(&self.out_proj, &y)
    }

    /// `x: [B, T, d]` continuing from `state` (or zeros), returning the output and the state after
    /// the last token — the chunked prefill.
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        state: Option<&MambaState>,
    ) -> Result<(Tensor, MambaState)> {
        let m = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let proj = crate::fused::apply_linear(&self.in_proj, x)?;
        let z = proj.narrow(D::Minus1, 0, m.inner())?;
        let xbc_in = proj.narrow(D::Minus1, m.inner(), m.conv_dim())?;

        let history = state.map(|s| &s.conv);
        let xbc =
            causal_depthwise_conv(&xbc_in, &self.conv_weight, self.conv_bias.as_ref(), history)?
                .silu()?;
        let k1 = m.conv_kernel - 1;
        let conv_state = {
            let full = match history {
                Some(h) => Tensor::cat(&[h, &xbc_in], 1)?,
                None => Tensor::cat(
                    &[
                        &Tensor::zeros((b, k1, m.conv_dim()), x.dtype(), x.device())?,
                        &xbc_in,
                    ],
                    1,
                )?,
            };
            full.narrow(1, full.dim(1)? - k1, k1)?
        };

        let gs = m.n_groups * m.state_size;
        let xs = xbc
            .narrow(D::Minus1, 0, m.inner())?
            .reshape((b, t, m.num_heads, m.head_dim))?;
        let bm = self.expand_groups(&xbc.narrow(D::Minus1, m.inner(), gs)?, b, t)?;
        let cm = self.expand_groups(&xbc.narrow(D::Minus1, m.inner() + gs, gs)?, b, t)?;

        let dt = self.dt(&proj)?;
        let a = self.a_log.exp()?.neg()?;
        let (y, ssm) = ssd_chunked(&xs, &dt, &a, &bm, &cm, m.chunk_size, state.map(|s| &s.ssm))?;
        Ok((
            self.finish(&y, &xs, &z)?,
            MambaState {
                conv: conv_state,
                ssm,
            },
        ))
    }

    /// `[B, T, groups*state]` → `[B, T, heads, state]`, each group shared by consecutive heads.
    fn expand_groups(&self, t_in: &Tensor, b: usize, t: usize) -> Result<Tensor> {
        let m = &self.cfg;
        Ok(t_in
            .reshape((b, t, m.n_groups, 1, m.state_size))?
            .broadcast_as((b, t, m.n_groups, m.heads_per_group(), m.state_size))?
            .reshape((b, t, m.num_heads, m.state_size))?)
    }
}

/// Batched matmul over any number of leading dimensions (candle's CPU matmul wants rank <= 4).
fn bmm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ad = a.dims();
    let bd = b.dims();
    let r = ad.len();
    let batch: usize = ad[..r - 2].iter().product();
    let (m, k, n) = (ad[r - 2], ad[r - 1], bd[r - 1]);
    let out = a
        .contiguous()?
        .reshape((batch, m, k))?
        .matmul(&b.contiguous()?.reshape((batch, k, n))?)?;
    let mut shape = ad[..r - 2].to_vec();
    shape.extend([m, n]);
    Ok(out.reshape(shape)?)
}

/// Lower-triangular (diagonal included) 0/1 mask `[l, l]`.
fn tril_mask(l: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..l * l)
        .map(|i| if i % l <= i / l { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(v, (l, l), device)?)
}

fn pad_time(x: &Tensor, pad: usize) -> Result<Tensor> {
    if pad == 0 {
        return Ok(x.clone());
    }
    let mut shape = x.dims().to_vec();
    shape[1] = pad;
    Ok(Tensor::cat(
        &[x, &Tensor::zeros(shape, x.dtype(), x.device())?],
        1,
    )?)
}

/// The SSD scan of Mamba-2 in chunks of `chunk` steps (the "state-space dual" form): quadratic
/// attention-like products inside a chunk, a linear recurrence of states across chunks.
///
/// `x: [B, T, H, P]`, `dt: [B, T, H]`, `a: [H]` (negative), `b`/`c: [B, T, H, N]`, optional
/// initial state `[B, H, P, N]`. Returns `y: [B, T, H, P]` (without the D skip) and the final state.
pub fn ssd_chunked(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    chunk: usize,
    initial: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (bs, t, h, p) = x.dims4()?;
    let n = b.dim(3)?;
    let nc = t.div_ceil(chunk);
    let pad = nc * chunk - t;
    let dev = x.device();

    // Padded steps have dt = 0: they neither decay nor feed the state.
    let xdt = pad_time(&x.broadcast_mul(&dt.unsqueeze(3)?)?, pad)?;
    let da = pad_time(&dt.broadcast_mul(&a.reshape((1, 1, h))?)?, pad)?;
    let b = pad_time(b, pad)?;
    let c = pad_time(c, pad)?;

    // [B, nc, l, H, *] -> [B, H, nc, l, *]
    let xdt = xdt
        .reshape((bs, nc, chunk, h, p))?
        .permute((0, 3, 1, 2, 4))?
        .contiguous()?;
    let b = b
        .reshape((bs, nc, chunk, h, n))?
        .permute((0, 3, 1, 2, 4))?
        .contiguous()?;
    let c = c
        .reshape((bs, nc, chunk, h, n))?
        .permute((0, 3, 1, 2, 4))?
        .contiguous()?;
    let da = da
        .reshape((bs, nc, chunk, h))?
        .permute((0, 3, 1, 2))?
        .contiguous()?;
    let cs = da.cumsum(3)?; // [B, H, nc, l]

    // Within a chunk: y_i = sum_{j<=i} (C_i·B_j) exp(cs_i - cs_j) xdt_j.
    let mask = tril_mask(chunk, dev)?.to_dtype(x.dtype())?;
    let diff = cs.unsqueeze(4)?.broadcast_sub(&cs.unsqueeze(3)?)?;
    // Masking before exp keeps the (positive) upper-triangle differences from overflowing.
    let decay_in = diff.broadcast_mul(&mask)?.exp()?.broadcast_mul(&mask)?;
    let scores = bmm(&c, &b.transpose(3, 4)?)?;
    let y_diag = bmm(&(scores * decay_in)?, &xdt)?;

    // Each chunk's contribution to the state at its end.
    let cs_last = cs.narrow(3, chunk - 1, 1)?; // [B, H, nc, 1]
    let decay_to_end = cs_last.broadcast_sub(&cs)?.exp()?; // [B, H, nc, l]
    let chunk_states = xdt
        .broadcast_mul(&decay_to_end.unsqueeze(4)?)?
        .transpose(3, 4)?;
    let chunk_states = bmm(&chunk_states, &b)?; // [B, H, nc, P, N]

    // Across chunks: s_{k+1} = exp(cs_last_k) s_k + chunk_state_k.
    let chunk_decay = cs_last.exp()?; // [B, H, nc, 1]
    let mut state = match initial {
        Some(s) => s.clone(),
        None => Tensor::zeros((bs, h, p, n), x.dtype(), dev)?,
    };
    let mut states_in = Vec::with_capacity(nc);
    for k in 0..nc {
        states_in.push(state.clone());
        let decay = chunk_decay.narrow(2, k, 1)?.unsqueeze(4)?; // [B, H, 1, 1, 1]
        let decay = decay.squeeze(2)?; // [B, H, 1, 1]
        state = (state.broadcast_mul(&decay)? + chunk_states.narrow(2, k, 1)?.squeeze(2)?)?;
    }
    let states_in = Tensor::stack(&states_in, 2)?; // [B, H, nc, P, N]

    // Contribution of the state entering each chunk: y_i += exp(cs_i) C_i · s_in.
    let y_off = bmm(&c, &states_in.transpose(3, 4)?)?.broadcast_mul(&cs.exp()?.unsqueeze(4)?)?;
    let y = (y_diag + y_off)?
        .permute((0, 2, 3, 1, 4))?
        .reshape((bs, nc * chunk, h, p))?
        .narrow(1, 0, t)?;
    Ok((y, state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MambaConfig;
    use crate::fused::test_support::assert_same_value_and_gradient;
    use candle_core::{DType, IndexOp, Var};

    /// Step-by-step recurrence: s = exp(dt a) s + dt x Bᵀ, y = s C.
    fn ssd_recurrent(
        x: &Tensor,
        dt: &Tensor,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
    ) -> (Tensor, Tensor) {
        let (bs, t, h, p) = x.dims4().unwrap();
        let n = b.dim(3).unwrap();
        let mut s = Tensor::zeros((bs, h, p, n), DType::F32, x.device()).unwrap();
        let mut ys = vec![];
        for i in 0..t {
            let dti = dt.i((.., i)).unwrap(); // [B,H]
            let da = dti
                .broadcast_mul(a)
                .unwrap()
                .exp()
                .unwrap()
                .reshape((bs, h, 1, 1))
                .unwrap();
            let xi = x
                .i((.., i))
                .unwrap()
                .broadcast_mul(&dti.unsqueeze(2).unwrap())
                .unwrap(); // [B,H,P]
            let bi = b.i((.., i)).unwrap(); // [B,H,N]
            let outer = xi
                .unsqueeze(3)
                .unwrap()
                .broadcast_mul(&bi.unsqueeze(2).unwrap())
                .unwrap();
            s = (s.broadcast_mul(&da).unwrap() + outer).unwrap();
            let ci = c
                .i((.., i))
                .unwrap()
                .contiguous()
                .unwrap()
                .unsqueeze(3)
                .unwrap(); // [B,H,N,1]
            ys.push(s.matmul(&ci).unwrap().squeeze(3).unwrap());
        }
        (Tensor::stack(&ys, 1).unwrap(), s)
    }

    #[test]
    fn chunked_scan_equals_recurrence_for_every_chunk_size() {
        let dev = Device::Cpu;
        let (bs, t, h, p, n) = (2, 11, 3, 4, 5);
        let x = Tensor::randn(0f32, 1.0, (bs, t, h, p), &dev).unwrap();
        let dt = softplus(&Tensor::randn(0f32, 1.0, (bs, t, h), &dev).unwrap()).unwrap();
        let a = Tensor::new(&[-0.5f32, -1.0, -2.0], &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (bs, t, h, n), &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (bs, t, h, n), &dev).unwrap();
        let (y_ref, s_ref) = ssd_recurrent(&x, &dt, &a, &b, &c);
        for chunk in [1, 3, 4, 11, 16] {
            let (y, s) = ssd_chunked(&x, &dt, &a, &b, &c, chunk, None).unwrap();
            let ey = (y - &y_ref)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let es = (s - &s_ref)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(ey < 1e-4 && es < 1e-4, "chunk {chunk}: {ey} {es}");
        }
    }

    #[test]
    fn continuing_from_a_state_equals_one_pass() {
        let dev = Device::Cpu;
        let (bs, t, h, p, n) = (1, 10, 2, 3, 4);
        let x = Tensor::randn(0f32, 1.0, (bs, t, h, p), &dev).unwrap();
        let dt = softplus(&Tensor::randn(0f32, 1.0, (bs, t, h), &dev).unwrap()).unwrap();
        let a = Tensor::new(&[-0.3f32, -1.5], &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (bs, t, h, n), &dev).unwrap();
        let c = Tensor::randn(0f32, 1.0, (bs, t, h, n), &dev).unwrap();
        let (y_all, s_all) = ssd_chunked(&x, &dt, &a, &b, &c, 4, None).unwrap();
        let cut = 7;
        let part = |t: &Tensor, s, l| t.narrow(1, s, l).unwrap();
        let (_, s1) = ssd_chunked(
            &part(&x, 0, cut),
            &part(&dt, 0, cut),
            &a,
            &part(&b, 0, cut),
            &part(&c, 0, cut),
            4,
            None,
        )
        .unwrap();
        let (y2, s2) = ssd_chunked(
            &part(&x, cut, t - cut),
            &part(&dt, cut, t - cut),
            &a,
            &part(&b, cut, t - cut),
            &part(&c, cut, t - cut),
            4,
            Some(&s1),
        )
        .unwrap();
        let ey = (y2 - y_all.narrow(1, cut, t - cut).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let es = (s2 - s_all)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(ey < 1e-4 && es < 1e-4, "{ey} {es}");
    }

    // The fused scan against this file's chunked scan (value and gradient).
    fn config(heads: usize, head_dim: usize, groups: usize, state: usize) -> MambaConfig {
        MambaConfig {
            num_heads: heads,
            head_dim,
            n_groups: groups,
            state_size: state,
            conv_kernel: 4,
            chunk_size: 16,
            conv_bias: true,
            proj_bias: false,
            dt_min: 0.0,
            dt_max: f64::INFINITY,
        }
    }

    /// The same scan through candle's ops: groups expanded to heads, then the chunked scan.
    fn reference(xbc: &Tensor, dt: &Tensor, a: &Tensor, m: &MambaConfig) -> Tensor {
        let (b, t, _) = xbc.dims3().unwrap();
        let gs = m.n_groups * m.state_size;
        let expand = |v: Tensor| {
            v.reshape((b, t, m.n_groups, 1, m.state_size))
                .unwrap()
                .broadcast_as((b, t, m.n_groups, m.heads_per_group(), m.state_size))
                .unwrap()
                .reshape((b, t, m.num_heads, m.state_size))
                .unwrap()
        };
        let x = xbc
            .narrow(2, 0, m.inner())
            .unwrap()
            .reshape((b, t, m.num_heads, m.head_dim))
            .unwrap();
        let bm = expand(xbc.narrow(2, m.inner(), gs).unwrap());
        let cm = expand(xbc.narrow(2, m.inner() + gs, gs).unwrap());
        ssd_chunked(&x, dt, a, &bm, &cm, 16, None).unwrap().0
    }

    /// Values, gradients of `xbc`, `dt` and `a` for a weighted sum of the output, fused and
    /// reference, at lengths around the segment boundaries and with state widths that leave a
    /// remainder after the 8-lane loops.
    #[test]
    fn fused_scan_matches_the_chunked_scan_in_value_and_gradient() {
        let dev = Device::Cpu;
        for &(batch, time, heads, head_dim, groups, state) in &[
            (2, 2, 2, 3, 1, 5),
            (2, crate::fused::SEGMENT, 4, 4, 2, 8),
            (1, crate::fused::SEGMENT + 1, 2, 8, 1, 16),
            (3, 2 * crate::fused::SEGMENT + 7, 6, 4, 3, 11),
        ] {
            let m = config(heads, head_dim, groups, state);
            let conv_dim = m.inner() + 2 * groups * state;
            let xbc =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, time, conv_dim), &dev).unwrap())
                    .unwrap();
            let raw_dt = Tensor::randn(-1f32, 1.0, (batch, time, heads), &dev).unwrap();
            let dt = Var::from_tensor(&softplus(&raw_dt).unwrap()).unwrap();
            let a = Var::from_tensor(
                &Tensor::rand(0.2f32, 2.0, heads, &dev)
                    .unwrap()
                    .neg()
                    .unwrap(),
            )
            .unwrap();
            let w = Tensor::randn(0f32, 1.0, (batch, time, heads, head_dim), &dev).unwrap();
            let fused = crate::fused::ssd_scan(xbc.as_tensor(), dt.as_tensor(), a.as_tensor(), &m)
                .unwrap()
                .expect("f32 on CPU takes the fused op");
            let want = reference(xbc.as_tensor(), dt.as_tensor(), a.as_tensor(), &m);
            let case = format!("B{batch} T{time} H{heads} P{head_dim} G{groups} N{state}");
            assert_same_value_and_gradient(
                &case,
                fused,
                want,
                &w,
                &[("xbc", &xbc, true), ("dt", &dt, true), ("a", &a, true)],
                1e-4,
            );
        }
    }

    #[test]
    fn other_dtypes_fall_back_to_the_chunked_scan() {
        let dev = Device::Cpu;
        let m = config(2, 4, 1, 4);
        let xbc = Tensor::zeros((1, 3, m.inner() + 8), DType::F64, &dev).unwrap();
        let dt = Tensor::zeros((1, 3, 2), DType::F64, &dev).unwrap();
        let a = Tensor::zeros(2, DType::F64, &dev).unwrap();
        assert!(crate::fused::ssd_scan(&xbc, &dt, &a, &m).unwrap().is_none());
    }

    /// A one-block model of Mamba-2 layers, its mixer and its parameters.
    fn mixer(extra: &str) -> (Mamba2, crate::params::Params, usize) {
        let cfg = NemotronHConfig::from_json_str(&format!(
            r#"{{"model_type": "nemotron_h", "vocab_size": 16, "hidden_size": 24,
            "hybrid_override_pattern": "M", "mamba_num_heads": 4, "mamba_head_dim": 6,
            "ssm_state_size": 5, "n_groups": 2, "conv_kernel": 4, "chunk_size": 8, {extra}}}"#
        ))
        .unwrap();
        let params = crate::checkpoint::init_params(&cfg, 7, &Device::Cpu).unwrap();
        let path = params.root().pp("backbone").pp("layers").pp(0).pp("mixer");
        let mixer = Mamba2::new(&cfg, &path).unwrap();
        (mixer, params, cfg.hidden_size)
    }

    /// The fused mixer against the same layers one op at a time: values, and the gradients of
    /// the input and of every parameter, at lengths around the scan's segments, with and
    /// without the conv bias, with dt's clamp open above and closed, and with it binding.
    #[test]
    fn fused_mixer_matches_the_layers_one_by_one_in_value_and_gradient() {
        let dev = Device::Cpu;
        for (extra, batch, time) in [
            (
                r#""use_conv_bias": true, "time_step_limit": [0.0, Infinity]"#,
                2,
                5,
            ),
            (
                r#""use_conv_bias": true, "time_step_limit": [0.0, Infinity]"#,
                2,
                crate::fused::SEGMENT + 5,
            ),
            (
                r#""use_conv_bias": false, "time_step_limit": [0.02, 0.05]"#,
                3,
                37,
            ),
        ] {
            let (mixer, params, d) = mixer(extra);
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, time, d), &dev).unwrap())
                .unwrap();
            let fused = mixer.forward(x.as_tensor()).unwrap();
            let proj = crate::fused::apply_linear(&mixer.in_proj, x.as_tensor()).unwrap();
            let want = mixer.forward_layer_by_layer(x.as_tensor(), &proj).unwrap();
            // Large weights, so that the smallest gradients (dt's bias, A_log: dt is at most
            // 0.1) are above the comparison's absolute floor of 1e-4.
            let w = Tensor::randn(0f32, 1e4, (batch, time, d), &dev).unwrap();
            let vars: Vec<(String, Var)> = params
                .vars()
                .iter()
                .filter(|(name, _)| name.contains(".mixer."))
                .map(|(name, v)| (name.clone(), v.clone()))
                .collect();
            assert_eq!(
                vars.len(),
                8 - usize::from(extra.contains("false")),
                "{extra}"
            );
            let mut inputs = vec![("x", &x, true)];
            inputs.extend(vars.iter().map(|(name, v)| (name.as_str(), v, true)));
            let case = format!("{extra}, B{batch} T{time}");
            assert_same_value_and_gradient(&case, fused, want, &w, &inputs, 1e-4);
        }
    }

    /// dt's clamp binds where softplus falls outside it, and no gradient passes there: the
    /// clamped case above is only a test if some of its values were clamped.
    #[test]
    fn the_clamped_case_clamps() {
        let (mixer, _, d) = mixer(r#""use_conv_bias": false, "time_step_limit": [0.02, 0.05]"#);
        let x = Tensor::randn(0f32, 1.0, (3, 37, d), &Device::Cpu).unwrap();
        let proj = crate::fused::apply_linear(&mixer.in_proj, &x).unwrap();
        let m = &mixer.cfg;
        let raw = proj
            .narrow(D::Minus1, m.inner() + m.conv_dim(), m.num_heads)
            .unwrap()
            .broadcast_add(&mixer.dt_bias)
            .unwrap();
        let sp: Vec<f32> = softplus(&raw)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let below = sp.iter().filter(|&&v| v < 0.02).count();
        let above = sp.iter().filter(|&&v| v > 0.05).count();
        let inside = sp.len() - below - above;
        assert!(
            below > 0 && above > 0 && inside > 0,
            "{below} {inside} {above}"
        );
    }
}
