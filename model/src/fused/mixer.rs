//! The Mamba-2 mixer between its two projections as one op: the split of `in_proj`'s output
//! into z, xBC and dt, the causal conv with SiLU, dt's softplus and clamp, `A = -exp(A_log)`,
//! the scan, the D skip and the gated RMSNorm.
//!
//! Each of those was already a fused op or a few small ones, but candle's backward pass gives
//! every input of every node a zero-filled gradient and adds the node's contribution into it:
//! the three slices of `in_proj`'s output (`[B, T, 2 inner + 2 G N + H]`) each came back as a
//! zero-padded tensor of the full width, added into a zeroed one, and the slice of xBC for the
//! skip, the reshapes and the skip's sum added more. In a profile of the Mamba-2 block alone
//! (`small-d512`, 8 x 128) a fifth of its samples were those fills, copies and additions. Here
//! the only large input is `in_proj`'s output, and the backward pass writes each gradient once,
//! calling the same kernels as the separate ops ([`super::conv`], [`super::ssd_scan`],
//! [`super::gated_norm`]) on what the forward pass kept.

use std::ops::Range;
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::conv::CausalConvSilu;
use super::gated_norm::GatedRmsNorm;
use super::ssd_scan::SsdScan;
use super::{applies, contiguous_f32, storage_f32};
use crate::config::MambaConfig;
use crate::error::Result;

/// The mixer's parameters besides its two projections.
pub(crate) struct MixerParams<'a> {
    /// `[conv_dim, K]`.
    pub(crate) conv_weight: &'a Tensor,
    /// `[conv_dim]`; none reads as zeros.
    pub(crate) conv_bias: Option<&'a Tensor>,
    /// `[H]` each.
    pub(crate) dt_bias: &'a Tensor,
    pub(crate) a_log: &'a Tensor,
    pub(crate) d: &'a Tensor,
    /// `[inner]`.
    pub(crate) norm_weight: &'a Tensor,
}

/// The gated norm's output `[B, T, inner]` (what `out_proj` reads) for `proj: [B, T,
/// in_proj_dim]`, differentiable in `proj` and every parameter; `None` where the fused op does
/// not apply (not f32 on the CPU), and the caller runs the layers one by one.
pub(crate) fn mamba_mixer(
    proj: &Tensor,
    p: &MixerParams<'_>,
    cfg: &MambaConfig,
    eps: f64,
) -> Result<Option<Tensor>> {
    let bias = match p.conv_bias {
        Some(bias) => bias.clone(),
        None => Tensor::zeros(cfg.conv_dim(), proj.dtype(), proj.device())?,
    };
    if !applies(&[
        proj,
        p.conv_weight,
        &bias,
        p.dt_bias,
        p.a_log,
        p.d,
        p.norm_weight,
    ]) {
        return Ok(None);
    }
    // One input for the small parameters: candle's ops take at most three.
    let packed = Tensor::cat(&[&bias, p.dt_bias, p.a_log, p.d, p.norm_weight], 0)?;
    let op = MambaMixer {
        cfg: cfg.clone(),
        eps: eps as f32,
        scan: SsdScan::new(cfg),
        saved: Mutex::new(None),
    };
    Ok(Some(proj.contiguous()?.apply_op3(
        &p.conv_weight.contiguous()?,
        &packed,
        op,
    )?))
}

struct MambaMixer {
    cfg: MambaConfig,
    eps: f32,
    /// Holds the scan's checkpoints between the passes.
    scan: SsdScan,
    saved: Mutex<Option<Saved>>,
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// The conv's input and output (after SiLU), `[B, T, conv_dim]`.
    xbc_in: Tensor,
    xbc: Tensor,
    /// `[B, T, inner]`.
    z: Tensor,
    /// `dt + dt_bias` before softplus, `[B * T * H]`.
    raw_dt: Vec<f32>,
    /// `[B, T, H]` and `[H]`, as the scan read them.
    dt: Tensor,
    a: Tensor,
    /// The scan's output and the gated norm's input (the scan's output plus the D skip),
    /// `[B, T, inner]`.
    y: Tensor,
    gated_in: Tensor,
}

/// Where each parameter lies in the packed vector.
struct Packed {
    conv_bias: Range<usize>,
    dt_bias: Range<usize>,
    a_log: Range<usize>,
    d: Range<usize>,
    norm_weight: Range<usize>,
}

impl Packed {
    fn new(m: &MambaConfig) -> Self {
        let (cd, nh, inner) = (m.conv_dim(), m.num_heads, m.inner());
        Self {
            conv_bias: 0..cd,
            dt_bias: cd..cd + nh,
            a_log: cd + nh..cd + 2 * nh,
            d: cd + 2 * nh..cd + 3 * nh,
            norm_weight: cd + 3 * nh..cd + 3 * nh + inner,
        }
    }
    fn len(&self) -> usize {
        self.norm_weight.end
    }
}

/// The f32 values of a storage this module made.
fn into_f32(storage: CpuStorage) -> candle_core::Result<Vec<f32>> {
    match storage {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("Mamba-2 mixer: a fused op returned another dtype than f32"),
    }
}

/// `softplus(v)` as [`crate::nn::softplus`] computes it.
fn softplus(v: f32) -> f32 {
    v.max(0.0) + ((-v.abs()).exp() + 1.0).ln()
}

impl MambaMixer {
    /// `(batch, time)` of a call, its inputs checked against the config.
    fn dims(
        &self,
        proj: &Layout,
        w: &Layout,
        packed: &Layout,
    ) -> candle_core::Result<(usize, usize)> {
        let m = &self.cfg;
        let (batch, time, width) = proj.shape().dims3()?;
        if width != m.in_proj_dim()
            || w.shape().dims() != [m.conv_dim(), m.conv_kernel]
            || packed.shape().dims() != [Packed::new(m).len()]
        {
            candle_core::bail!(
                "Mamba-2 mixer: in_proj output {:?}, conv weight {:?} and packed parameters {:?} \
                 do not match rows of {}, [{}, {}] and [{}]",
                proj.shape(),
                w.shape(),
                packed.shape(),
                m.in_proj_dim(),
                m.conv_dim(),
                m.conv_kernel,
                Packed::new(m).len()
            );
        }
        Ok((batch, time))
    }

    /// `(inner, conv_dim, heads, head_dim, in_proj_dim)`.
    fn widths(&self) -> (usize, usize, usize, usize, usize) {
        let m = &self.cfg;
        (
            m.inner(),
            m.conv_dim(),
            m.num_heads,
            m.head_dim,
            m.in_proj_dim(),
        )
    }

    /// dt as the scan reads it: softplus, then clamped to the config's range.
    fn clamp_dt(&self, softplus: f32) -> f32 {
        let dt = softplus.max(self.cfg.dt_min as f32);
        if self.cfg.dt_max.is_finite() {
            dt.min(self.cfg.dt_max as f32)
        } else {
            dt
        }
    }

    /// Whether dt's clamp passed `softplus` through (its gradient flows).
    fn dt_passes(&self, softplus: f32) -> bool {
        softplus > self.cfg.dt_min as f32
            && (!self.cfg.dt_max.is_finite() || softplus < self.cfg.dt_max as f32)
    }
}

impl CustomOp3 for MambaMixer {
    fn name(&self) -> &'static str {
        "chorus-mamba-mixer"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, time) = self.dims(l1, l2, l3)?;
        let m = &self.cfg;
        let (inner, cd, nh, hd, width) = self.widths();
        let rows = batch * time;
        let proj = contiguous_f32(s1, l1, "Mamba-2 mixer: in_proj's output")?;
        let packed = contiguous_f32(s3, l3, "Mamba-2 mixer: parameters")?;
        let at = Packed::new(m);
        let dt_bias = &packed[at.dt_bias.clone()];
        let d_skip = &packed[at.d.clone()];

        let (mut z, mut xbc_in, mut raw_dt) = (
            vec![0f32; rows * inner],
            vec![0f32; rows * cd],
            vec![0f32; rows * nh],
        );
        z.par_chunks_mut(inner)
            .zip(xbc_in.par_chunks_mut(cd))
            .zip(raw_dt.par_chunks_mut(nh))
            .zip(proj.par_chunks(width))
            .for_each(|(((z, x), raw), p)| {
                z.copy_from_slice(&p[..inner]);
                x.copy_from_slice(&p[inner..inner + cd]);
                for ((r, &v), &b) in raw.iter_mut().zip(&p[inner + cd..]).zip(dt_bias) {
                    *r = v + b;
                }
            });
        let dt: Vec<f32> = raw_dt.iter().map(|&r| self.clamp_dt(softplus(r))).collect();
        let a: Vec<f32> = packed[at.a_log.clone()].iter().map(|v| -v.exp()).collect();

        let conv_shape = Shape::from((batch, time, cd));
        let xbc_in = CpuStorage::F32(xbc_in);
        let (xbc, _) = CausalConvSilu.cpu_fwd(
            &xbc_in,
            &Layout::contiguous(conv_shape.clone()),
            s2,
            l2,
            &CpuStorage::F32(packed[at.conv_bias.clone()].to_vec()),
            &Layout::contiguous(cd),
        )?;
        let (dt, a) = (CpuStorage::F32(dt), CpuStorage::F32(a));
        let (y, _) = self.scan.cpu_fwd(
            &xbc,
            &Layout::contiguous(conv_shape.clone()),
            &dt,
            &Layout::contiguous((batch, time, nh)),
            &a,
            &Layout::contiguous(nh),
        )?;
        let (xbc, y) = (into_f32(xbc)?, into_f32(y)?);
        let mut gated_in = vec![0f32; rows * inner];
        gated_in
            .par_chunks_mut(inner)
            .zip(y.par_chunks(inner))
            .zip(xbc.par_chunks(cd))
            .for_each(|((g, y), x)| {
                for (c, (g, &y)) in g.iter_mut().zip(y).enumerate() {
                    *g = y + x[c] * d_skip[c / hd];
                }
            });
        let inner_shape = Shape::from((batch, time, inner));
        let (gated_in, z) = (CpuStorage::F32(gated_in), CpuStorage::F32(z));
        let norm = GatedRmsNorm {
            group_size: m.norm_group_size(),
            eps: self.eps,
        };
        let (out, _) = norm.cpu_fwd(
            &gated_in,
            &Layout::contiguous(inner_shape.clone()),
            &z,
            &Layout::contiguous(inner_shape.clone()),
            &CpuStorage::F32(packed[at.norm_weight.clone()].to_vec()),
            &Layout::contiguous(inner),
        )?;

        let cpu = Device::Cpu;
        let tensor = |v: Vec<f32>, shape: &Shape| Tensor::from_vec(v, shape.clone(), &cpu);
        *self.saved.lock().expect("Mamba-2 mixer's saved values") = Some(Saved {
            xbc_in: tensor(into_f32(xbc_in)?, &conv_shape)?,
            xbc: tensor(xbc, &conv_shape)?,
            z: tensor(into_f32(z)?, &inner_shape)?,
            raw_dt,
            dt: tensor(into_f32(dt)?, &Shape::from((batch, time, nh)))?,
            a: tensor(into_f32(a)?, &Shape::from(nh))?,
            y: tensor(y, &inner_shape)?,
            gated_in: tensor(into_f32(gated_in)?, &inner_shape)?,
        });
        Ok((out, inner_shape))
    }

    fn bwd(
        &self,
        proj: &Tensor,
        conv_weight: &Tensor,
        packed: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().expect("Mamba-2 mixer's saved values");
        let Some(s) = saved.as_ref() else {
            candle_core::bail!("Mamba-2 mixer: backward pass without its forward pass");
        };
        let m = &self.cfg;
        let (inner, cd, nh, hd, width) = self.widths();
        let rows = proj.elem_count() / width;
        let at = Packed::new(m);
        let packed_v = packed.flatten_all()?.to_vec1::<f32>()?;
        let part = |r: &Range<usize>| packed.narrow(0, r.start, r.len());
        let missing = |what: &str| candle_core::Error::Msg(format!("Mamba-2 mixer: no {what}"));

        let norm = GatedRmsNorm {
            group_size: m.norm_group_size(),
            eps: self.eps,
        };
        let (d_gated, dz, d_norm_weight) = norm.bwd(
            &s.gated_in,
            &s.z,
            &part(&at.norm_weight)?,
            res,
            &grad_res.contiguous()?,
        )?;
        let d_gated = d_gated.ok_or_else(|| missing("gradient of the gated norm's input"))?;
        let dz = dz.ok_or_else(|| missing("gradient of z"))?;
        let d_norm_weight = d_norm_weight.ok_or_else(|| missing("gradient of the norm weight"))?;

        let (dxbc, ddt, da) = self.scan.bwd(&s.xbc, &s.dt, &s.a, &s.y, &d_gated)?;
        let mut dxbc = dxbc
            .ok_or_else(|| missing("gradient of xBC"))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let ddt = ddt
            .ok_or_else(|| missing("gradient of dt"))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let da = da
            .ok_or_else(|| missing("gradient of A"))?
            .to_vec1::<f32>()?;

        // The D skip: its share of x's gradient, and D's own.
        let d_skip = &packed_v[at.d.clone()];
        let mut dd = vec![0f32; nh];
        {
            let (gs, gl) = d_gated.storage_and_layout();
            let dg = storage_f32(&gs, gl, "Mamba-2 mixer: the gated norm input's gradient")?;
            let (xs, xl) = s.xbc.storage_and_layout();
            let x = storage_f32(&xs, xl, "Mamba-2 mixer: xBC")?;
            for (g, x) in dg.chunks_exact(inner).zip(x.chunks_exact(cd)) {
                for (c, (&g, &x)) in g.iter().zip(x).enumerate() {
                    dd[c / hd] += g * x;
                }
            }
            dxbc.par_chunks_mut(cd)
                .zip(dg.par_chunks(inner))
                .for_each(|(dx, g)| {
                    for (c, (dx, &g)) in dx.iter_mut().zip(g).enumerate() {
                        *dx += g * d_skip[c / hd];
                    }
                });
        }
        let dxbc = Tensor::from_vec(dxbc, s.xbc.shape(), s.xbc.device())?;
        let (dxbc_in, d_conv_weight, d_conv_bias) =
            CausalConvSilu.bwd(&s.xbc_in, conv_weight, &part(&at.conv_bias)?, &s.xbc, &dxbc)?;
        let dxbc_in = dxbc_in.ok_or_else(|| missing("gradient of the conv's input"))?;
        let d_conv_bias = d_conv_bias.ok_or_else(|| missing("gradient of the conv bias"))?;

        // dt = clamp(softplus(raw)): softplus' slope is sigmoid(raw); the clamp passes it or not.
        let d_raw: Vec<f32> = ddt
            .iter()
            .zip(&s.raw_dt)
            .map(|(&g, &r)| {
                if self.dt_passes(softplus(r)) {
                    g / (1.0 + (-r).exp())
                } else {
                    0.0
                }
            })
            .collect();
        let mut d_dt_bias = vec![0f32; nh];
        for row in d_raw.chunks_exact(nh) {
            for (acc, &g) in d_dt_bias.iter_mut().zip(row) {
                *acc += g;
            }
        }
        // a = -exp(A_log), so da/dA_log = a.
        let a = s.a.to_vec1::<f32>()?;
        let d_a_log: Vec<f32> = da.iter().zip(&a).map(|(g, a)| g * a).collect();

        let mut dproj = vec![0f32; rows * width];
        {
            let (zs, zl) = dz.storage_and_layout();
            let dz = storage_f32(&zs, zl, "Mamba-2 mixer: z's gradient")?;
            let (xs, xl) = dxbc_in.storage_and_layout();
            let dx = storage_f32(&xs, xl, "Mamba-2 mixer: the conv input's gradient")?;
            dproj
                .par_chunks_mut(width)
                .zip(dz.par_chunks(inner))
                .zip(dx.par_chunks(cd))
                .zip(d_raw.par_chunks(nh))
                .for_each(|(((out, dz), dx), dt)| {
                    out[..inner].copy_from_slice(dz);
                    out[inner..inner + cd].copy_from_slice(dx);
                    out[inner + cd..].copy_from_slice(dt);
                });
        }
        let mut d_packed = d_conv_bias.to_vec1::<f32>()?;
        d_packed.extend_from_slice(&d_dt_bias);
        d_packed.extend_from_slice(&d_a_log);
        d_packed.extend_from_slice(&dd);
        d_packed.extend(d_norm_weight.to_vec1::<f32>()?);
        let dev = proj.device();
        Ok((
            Some(Tensor::from_vec(dproj, proj.shape(), dev)?),
            d_conv_weight,
            Some(Tensor::from_vec(d_packed, packed.shape(), dev)?),
        ))
    }
}
