//! The Mamba-2 scan of the training forward pass as one fused CPU op with its own backward.
//!
//! Written from candle's primitives ([`crate::ssd_chunked`]) the scan is some forty tensor ops,
//! most of them element-wise passes over `[B, H, chunks, l, l]` or `[B, H, chunks, P, N]`
//! intermediates that autograd keeps for the backward pass; on CPU they made the Mamba-2 block
//! about two thirds of a training step. Here the recurrence `s_t = exp(dt_t a) s_{t-1} +
//! dt_t x_t b_tᵀ`, `y_t = s_t c_t` runs step by step per (sequence, head), the state in cache,
//! over all sequences and groups in parallel, and reads `x`, `b` and `c` where the causal conv
//! left them (one `[B, T, conv_dim]` tensor, groups not expanded to heads).
//!
//! The forward pass keeps the state at the start of every segment of [`SEGMENT`] steps; the
//! backward pass walks the segments from the last, recomputes a segment's states from its
//! checkpoint, and walks its steps backwards ([`simd::ssm_head_backward`]). Memory beyond the
//! inputs: the checkpoints (`B * H * T / SEGMENT` states) and one segment's states per task.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::config::MambaConfig;
use crate::error::Result;
use crate::simd;

use super::{applies, contiguous_f32, storage_f32};

/// Steps between the states the forward pass keeps for the backward pass.
pub(crate) const SEGMENT: usize = 32;

/// The scan's output `y: [B, T, H, P]` (without the D skip) from the zero state, for
/// `xbc: [B, T, conv_dim]` (`x | b | c` after the conv and SiLU), `dt: [B, T, H]` (after
/// softplus and clamping) and `a: [H]` (negative). Differentiable in all three.
///
/// `None` where the fused op does not apply (not f32 on CPU): the caller runs
/// [`crate::ssd_chunked`] instead.
pub(crate) fn ssd_scan(
    xbc: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    cfg: &MambaConfig,
) -> Result<Option<Tensor>> {
    if !applies(&[xbc, dt, a]) {
        return Ok(None);
    }
    let (b, t, _) = xbc.dims3()?;
    let op = SsdScan::new(cfg);
    let y = xbc
        .contiguous()?
        .apply_op3(&dt.contiguous()?, &a.contiguous()?, op)?;
    Ok(Some(y.reshape((b, t, cfg.num_heads, cfg.head_dim))?))
}

/// Sizes of one scan; the checkpoints its forward pass left for its backward pass.
pub(super) struct SsdScan {
    heads: usize,
    head_dim: usize,
    groups: usize,
    state: usize,
    /// `[B, groups, heads_per_group, segments, P, N]`: each task's states in one run.
    checkpoints: Mutex<Vec<f32>>,
}

/// The shape of one call, checked against the op's sizes.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    time: usize,
    conv_dim: usize,
    heads: usize,
    head_dim: usize,
    groups: usize,
    state: usize,
}

impl Dims {
    fn heads_per_group(&self) -> usize {
        self.heads / self.groups
    }
    fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
    fn segments(&self) -> usize {
        self.time.div_ceil(SEGMENT)
    }
    fn state_len(&self) -> usize {
        self.head_dim * self.state
    }
    /// Offsets of `x` of head `h`, `b` and `c` of group `g` in the row of step `(batch, t)`.
    fn row(&self, batch: usize, t: usize) -> usize {
        (batch * self.time + t) * self.conv_dim
    }
    fn x_at(&self, h: usize) -> usize {
        h * self.head_dim
    }
    fn b_at(&self, g: usize) -> usize {
        self.inner() + g * self.state
    }
    fn c_at(&self, g: usize) -> usize {
        self.inner() + (self.groups + g) * self.state
    }
    /// The checkpoints of one (batch, group) task.
    fn task_checkpoints(&self) -> usize {
        self.heads_per_group() * self.segments() * self.state_len()
    }
}

impl SsdScan {
    pub(super) fn new(cfg: &MambaConfig) -> Self {
        Self {
            heads: cfg.num_heads,
            head_dim: cfg.head_dim,
            groups: cfg.n_groups,
            state: cfg.state_size,
            checkpoints: Mutex::new(Vec::new()),
        }
    }

    fn dims(&self, xbc: &Layout, dt: &Layout, a: &Layout) -> candle_core::Result<Dims> {
        let (batch, time, conv_dim) = xbc.shape().dims3()?;
        let d = Dims {
            batch,
            time,
            conv_dim,
            heads: self.heads,
            head_dim: self.head_dim,
            groups: self.groups,
            state: self.state,
        };
        if conv_dim != d.inner() + 2 * d.groups * d.state || !d.heads.is_multiple_of(d.groups) {
            candle_core::bail!(
                "ssd_scan: xbc rows of {conv_dim} values do not hold {} heads of {} and {} groups of b and c of {}",
                d.heads,
                d.head_dim,
                d.groups,
                d.state
            );
        }
        if dt.shape().dims() != [batch, time, d.heads] || a.shape().dims() != [d.heads] {
            candle_core::bail!(
                "ssd_scan: dt {:?} and a {:?} do not match [{batch}, {time}, {}] and [{}]",
                dt.shape(),
                a.shape(),
                d.heads,
                d.heads
            );
        }
        Ok(d)
    }
}

impl CustomOp3 for SsdScan {
    fn name(&self) -> &'static str {
        "chorus-ssd-scan"
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
        let d = self.dims(l1, l2, l3)?;
        let xbc = contiguous_f32(s1, l1, "ssd_scan: xbc")?;
        let dt = contiguous_f32(s2, l2, "ssd_scan: dt")?;
        let a = contiguous_f32(s3, l3, "ssd_scan: a")?;
        let (hpg, p, sl) = (d.heads_per_group(), d.head_dim, d.state_len());
        let tasks = d.batch * d.groups;
        let mut checkpoints = vec![0f32; tasks * d.task_checkpoints()];
        // Each task's outputs `[T, heads_per_group, P]`, copied into place below.
        let mut outputs = vec![0f32; tasks * d.time * hpg * p];
        checkpoints
            .par_chunks_mut(d.task_checkpoints().max(1))
            .zip(outputs.par_chunks_mut((d.time * hpg * p).max(1)))
            .enumerate()
            .for_each(|(task, (ckpt, out))| {
                let (batch, g) = (task / d.groups, task % d.groups);
                let mut state = vec![0f32; sl];
                for hl in 0..hpg {
                    let h = g * hpg + hl;
                    state.fill(0.0);
                    for t in 0..d.time {
                        if t % SEGMENT == 0 {
                            let at = (hl * d.segments() + t / SEGMENT) * sl;
                            ckpt[at..at + sl].copy_from_slice(&state);
                        }
                        let row = &xbc[d.row(batch, t)..d.row(batch, t) + d.conv_dim];
                        let step = dt[(batch * d.time + t) * d.heads + h];
                        simd::ssm_head(
                            &mut state,
                            (step * a[h]).exp(),
                            step,
                            0.0,
                            &row[d.x_at(h)..d.x_at(h) + p],
                            &row[d.b_at(g)..d.b_at(g) + d.state],
                            &row[d.c_at(g)..d.c_at(g) + d.state],
                            &mut out[(t * hpg + hl) * p..(t * hpg + hl + 1) * p],
                        );
                    }
                }
            });
        let mut y = vec![0f32; d.batch * d.time * d.inner()];
        for (task, out) in outputs.chunks_exact((d.time * hpg * p).max(1)).enumerate() {
            let (batch, g) = (task / d.groups, task % d.groups);
            for t in 0..d.time {
                let at = (batch * d.time + t) * d.inner() + g * hpg * p;
                y[at..at + hpg * p].copy_from_slice(&out[t * hpg * p..(t + 1) * hpg * p]);
            }
        }
        *self.checkpoints.lock().expect("ssd_scan checkpoints") = checkpoints;
        Ok((
            CpuStorage::F32(y),
            Shape::from((d.batch, d.time, d.inner())),
        ))
    }

    fn bwd(
        &self,
        xbc: &Tensor,
        dt: &Tensor,
        a: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad_res.contiguous()?;
        let (xs, xl) = xbc.storage_and_layout();
        let (ds, dl) = dt.storage_and_layout();
        let (as_, al) = a.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let d = self.dims(xl, dl, al)?;
        let xbc_v = storage_f32(&xs, xl, "ssd_scan: xbc")?;
        let dt_v = storage_f32(&ds, dl, "ssd_scan: dt")?;
        let a_v = storage_f32(&as_, al, "ssd_scan: a")?;
        let dy_v = storage_f32(&gs, gl, "ssd_scan: the output's gradient")?;
        let checkpoints = self.checkpoints.lock().expect("ssd_scan checkpoints");
        if checkpoints.len() != d.batch * d.groups * d.task_checkpoints() {
            candle_core::bail!("ssd_scan: backward pass without its forward pass's checkpoints");
        }
        let (hpg, p, n, sl) = (d.heads_per_group(), d.head_dim, d.state, d.state_len());

        /// One (batch, group) task's gradients: `x` per step and head, `b` and `c` per step
        /// (summed over the group's heads), `dt` per step and head, `a` per head.
        struct TaskGrads {
            dx: Vec<f32>,
            db: Vec<f32>,
            dc: Vec<f32>,
            ddt: Vec<f32>,
            da: Vec<f32>,
        }
        let grads: Vec<TaskGrads> = (0..d.batch * d.groups)
            .into_par_iter()
            .map(|task| {
                let (batch, g) = (task / d.groups, task % d.groups);
                let ckpt = &checkpoints[task * d.task_checkpoints()..][..d.task_checkpoints()];
                let mut out = TaskGrads {
                    dx: vec![0f32; d.time * hpg * p],
                    db: vec![0f32; d.time * n],
                    dc: vec![0f32; d.time * n],
                    ddt: vec![0f32; d.time * hpg],
                    da: vec![0f32; hpg],
                };
                // States of one segment: entry 0 before its first step, entry i after step i.
                let mut states = vec![0f32; (SEGMENT + 1) * sl];
                let mut dstate = vec![0f32; sl];
                let mut du = vec![0f32; p];
                for hl in 0..hpg {
                    let h = g * hpg + hl;
                    dstate.fill(0.0);
                    for seg in (0..d.segments()).rev() {
                        let t0 = seg * SEGMENT;
                        let len = SEGMENT.min(d.time - t0);
                        let at = (hl * d.segments() + seg) * sl;
                        states[..sl].copy_from_slice(&ckpt[at..at + sl]);
                        for i in 0..len {
                            let t = t0 + i;
                            let row = &xbc_v[d.row(batch, t)..][..d.conv_dim];
                            let step = dt_v[(batch * d.time + t) * d.heads + h];
                            let (before, after) = states.split_at_mut((i + 1) * sl);
                            simd::ssm_state_step(
                                &before[i * sl..],
                                &mut after[..sl],
                                (step * a_v[h]).exp(),
                                step,
                                &row[d.x_at(h)..][..p],
                                &row[d.b_at(g)..][..n],
                            );
                        }
                        for i in (0..len).rev() {
                            let t = t0 + i;
                            let row = &xbc_v[d.row(batch, t)..][..d.conv_dim];
                            let step = dt_v[(batch * d.time + t) * d.heads + h];
                            let decay = (step * a_v[h]).exp();
                            let x = &row[d.x_at(h)..][..p];
                            let dy = &dy_v[(batch * d.time + t) * d.inner() + h * p..][..p];
                            let ddecay = simd::ssm_head_backward(
                                &mut dstate,
                                decay,
                                step,
                                x,
                                &row[d.b_at(g)..][..n],
                                &row[d.c_at(g)..][..n],
                                dy,
                                &states[(i + 1) * sl..][..sl],
                                &states[i * sl..][..sl],
                                &mut out.db[t * n..][..n],
                                &mut out.dc[t * n..][..n],
                                &mut du,
                            );
                            let dx = &mut out.dx[(t * hpg + hl) * p..][..p];
                            let mut ddt = 0f32;
                            for ((o, &g_u), &xv) in dx.iter_mut().zip(&du).zip(x) {
                                *o = step * g_u;
                                ddt += g_u * xv;
                            }
                            // decay = exp(step * a): d decay / d step = a * decay.
                            out.ddt[t * hpg + hl] = ddt + ddecay * decay * a_v[h];
                            out.da[hl] += ddecay * decay * step;
                        }
                    }
                }
                out
            })
            .collect();
        drop(checkpoints);

        let mut dxbc = vec![0f32; d.batch * d.time * d.conv_dim];
        let mut ddt = vec![0f32; d.batch * d.time * d.heads];
        let mut da = vec![0f32; d.heads];
        for (task, tg) in grads.iter().enumerate() {
            let (batch, g) = (task / d.groups, task % d.groups);
            for t in 0..d.time {
                let row = &mut dxbc[d.row(batch, t)..][..d.conv_dim];
                row[d.x_at(g * hpg)..][..hpg * p].copy_from_slice(&tg.dx[t * hpg * p..][..hpg * p]);
                row[d.b_at(g)..][..n].copy_from_slice(&tg.db[t * n..][..n]);
                row[d.c_at(g)..][..n].copy_from_slice(&tg.dc[t * n..][..n]);
                ddt[(batch * d.time + t) * d.heads + g * hpg..][..hpg]
                    .copy_from_slice(&tg.ddt[t * hpg..][..hpg]);
            }
            for (acc, v) in da[g * hpg..][..hpg].iter_mut().zip(&tg.da) {
                *acc += v;
            }
        }
        let dev = xbc.device();
        Ok((
            Some(Tensor::from_vec(dxbc, xbc.shape(), dev)?),
            Some(Tensor::from_vec(ddt, dt.shape(), dev)?),
            Some(Tensor::from_vec(da, a.shape(), dev)?),
        ))
    }
}
