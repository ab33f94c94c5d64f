//! Compute pipelines with explicit bind group layouts, and prepared dispatches.
//!
//! Explicit layouts (rather than wgpu's layout derived from the shader) keep a binding that an
//! override constant compiles away (e.g. the gate input of the ReLU activation) part of the
//! layout, so every variant of a kernel binds the same buffers.
//!
//! Group 0 holds the kernel's buffers. In the native f16 form ([`Half::Native`]) group 1 holds
//! `array<f16>` views of some of them ([`shaders::f16_views`]): the same buffers bound again,
//! with the same access, which the caller never names.

use std::borrow::Cow;

use crate::backend::gpu::device::GpuContext;
use crate::backend::gpu::shaders::{self, Half};
use crate::backend::gpu::GpuError;

/// What one binding of a kernel is, in binding order (binding i is the i-th).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    Uniform,
    /// Read-only storage.
    Read,
    /// Read-write storage.
    ReadWrite,
}

/// A compiled compute pipeline and its bind group layout.
#[derive(Debug)]
pub struct Kernel {
    pub name: String,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    bindings: Vec<Binding>,
    /// Group 1 (native f16 form only): its layout, and which group-0 buffer each view shows.
    views: Option<(wgpu::BindGroupLayout, Vec<usize>)>,
}

impl Kernel {
    /// Compiles kernel `name`'s entry point `entry` with override `constants`. Shader errors
    /// (which naga tests should have caught) come back as [`GpuError::Validation`].
    pub fn new(
        ctx: &GpuContext,
        name: &str,
        entry: &str,
        bindings: &[Binding],
        constants: &[(&str, f64)],
    ) -> Result<Kernel, GpuError> {
        let src = shaders::source(name, ctx.half)
            .ok_or_else(|| GpuError::Shape(format!("no shader named `{name}`")))?;
        let device = &ctx.device;
        let view_of: Vec<usize> = match ctx.half {
            Half::Packed => Vec::new(),
            Half::Native => shaders::f16_views(name)
                .iter()
                .map(|&b| b as usize)
                .collect(),
        };
        if let Some(&b) = view_of.iter().find(|&&b| b >= bindings.len()) {
            return Err(GpuError::Shape(format!(
                "kernel `{name}` has an f16 view of binding {b}, but only {} bindings",
                bindings.len()
            )));
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(Cow::Owned(src)),
        });
        let layout = group_layout(device, name, bindings.iter().copied());
        let views = (!view_of.is_empty()).then(|| {
            let layout = group_layout(device, name, view_of.iter().map(|&b| bindings[b]));
            (layout, view_of)
        });
        let mut groups = vec![Some(&layout)];
        if let Some((v, _)) = &views {
            groups.push(Some(v));
        }
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(name),
            bind_group_layouts: &groups,
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants,
                // Every kernel writes its workgroup memory before reading it.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Validation {
                what: format!("kernel `{name}` ({entry}, {constants:?})"),
                reason: e.to_string(),
            });
        }
        Ok(Kernel {
            name: name.to_string(),
            pipeline,
            layout,
            bindings: bindings.to_vec(),
            views,
        })
    }

    /// Binds `buffers` (one per binding, in order) and prepares a dispatch of `groups`.
    pub fn dispatch(
        &self,
        ctx: &GpuContext,
        buffers: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) -> Result<Dispatch, GpuError> {
        if buffers.len() != self.bindings.len() {
            return Err(GpuError::Shape(format!(
                "kernel `{}` takes {} buffers, got {}",
                self.name,
                self.bindings.len(),
                buffers.len()
            )));
        }
        let bind_group = bind(ctx, &self.name, &self.layout, buffers.iter().copied());
        let views = self
            .views
            .as_ref()
            .map(|(layout, of)| bind(ctx, &self.name, layout, of.iter().map(|&b| buffers[b])));
        Ok(Dispatch {
            pipeline: self.pipeline.clone(),
            bind_group,
            views,
            groups,
            columns: Columns::One,
        })
    }
}

/// A bind group layout of buffer `bindings`, numbered in order from 0.
fn group_layout(
    device: &wgpu::Device,
    label: &str,
    bindings: impl Iterator<Item = Binding>,
) -> wgpu::BindGroupLayout {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: match b {
                    Binding::Uniform => wgpu::BufferBindingType::Uniform,
                    Binding::Read => wgpu::BufferBindingType::Storage { read_only: true },
                    Binding::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(label),
        entries: &entries,
    })
}

/// A bind group of `buffers`, whole, numbered in order from 0.
fn bind<'a>(
    ctx: &GpuContext,
    label: &str,
    layout: &wgpu::BindGroupLayout,
    buffers: impl Iterator<Item = &'a wgpu::Buffer>,
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry> = buffers
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: b.as_entire_binding(),
        })
        .collect();
    ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout,
        entries: &entries,
    })
}

/// How a dispatch covers the columns of a pass (the positions of a verify pass, one per token;
/// a decode step has one): workgroups along z index them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Columns {
    /// The dispatch does not take columns: `groups` as prepared.
    One,
    /// One workgroup layer along z per column.
    Each,
    /// One workgroup layer along z per `n` columns (the matvec takes 8 at a time).
    Blocks(u32),
}

/// A pipeline bound to its buffers: encoding it is two calls and a dispatch. Prepared once
/// (e.g. per layer when a decoder is built) and encoded every token.
#[derive(Clone, Debug)]
pub struct Dispatch {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    /// Group 1: the native f16 form's views.
    views: Option<wgpu::BindGroup>,
    pub groups: [u32; 3],
    pub columns: Columns,
}

impl Dispatch {
    /// Encodes a pass of one column.
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        self.encode_columns(pass, 1);
    }

    /// Encodes a pass over `n` columns (at least one).
    pub fn encode_columns(&self, pass: &mut wgpu::ComputePass<'_>, n: usize) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        if let Some(v) = &self.views {
            pass.set_bind_group(1, v, &[]);
        }
        let [x, y, z] = self.groups;
        let n = n.max(1) as u32;
        let z = match self.columns {
            Columns::One => z,
            Columns::Each => n,
            Columns::Blocks(b) => n.div_ceil(b),
        };
        pass.dispatch_workgroups(x, y, z);
    }

    /// This dispatch, covering the columns `columns` says.
    pub fn with_columns(mut self, columns: Columns) -> Dispatch {
        self.columns = columns;
        self
    }
}

/// Workgroup counts for `n` workgroups: a 2-D grid when `n` exceeds the per-dimension limit
/// (e.g. one workgroup per 4 rows of a 150k-token vocabulary). Kernels rebuild the flat index
/// as `x + y * groups_x`, and skip the few extra workgroups of the last row of the grid.
pub fn grid(ctx: &GpuContext, n: u32) -> [u32; 3] {
    let max = ctx.limits.max_compute_workgroups_per_dimension.max(1);
    if n <= max {
        [n.max(1), 1, 1]
    } else {
        [max, n.div_ceil(max), 1]
    }
}

/// Encodes `dispatches` in order into one compute pass and submits them. wgpu orders the
/// dispatches of a pass (each is its own usage scope), so a kernel sees its predecessors' writes.
pub fn submit(ctx: &GpuContext, dispatches: &[Dispatch]) {
    let mut enc = ctx
        .device
        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        for d in dispatches {
            d.encode(&mut pass);
        }
    }
    ctx.queue.submit([enc.finish()]);
}
