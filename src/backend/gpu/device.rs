//! The GPU device the backend runs on, and what it allows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::backend::gpu::pipeline::{Binding, Kernel};
use crate::backend::gpu::shaders::{Half, NATIVE_STORAGE_BUFFERS};
use crate::backend::gpu::GpuError;

/// Whether `limits` allow the native f16 form's extra storage bindings.
fn native_fits(limits: &wgpu::Limits) -> bool {
    limits.max_storage_buffers_per_shader_stage >= NATIVE_STORAGE_BUFFERS
}

/// How the engine picks its GPU.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Take the first adapter whose name contains this (case-insensitive), e.g. "llvmpipe" or
    /// "nvidia"; `None` takes wgpu's high-performance choice.
    pub adapter: Option<String>,
    /// Backends to consider. `None` (or `WGPU_BACKEND` unset): the primary ones (Vulkan, Metal,
    /// DX12) first, and OpenGL only if none of them has an adapter (or the one asked for).
    pub backends: Option<wgpu::Backends>,
    /// How the shaders read f16 values (weights' scales, f16 weights, an f16 KV cache).
    pub f16: F16Mode,
}

/// The user's choice of f16 form ([`Half`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum F16Mode {
    /// Native where the adapter offers SHADER_F16, packed where it does not. (On lavapipe the
    /// two measured the same, within noise: docs/benchmarks.md.)
    #[default]
    Auto,
    /// `array<f16>` views (needs SHADER_F16; refused with a message where it is absent).
    Native,
    /// Two f16 per `u32`, unpacked in the shader: runs on every adapter.
    Packed,
}

impl F16Mode {
    /// The form this choice gives on a device where the native form runs or not.
    pub fn resolve(self, native_runs: bool) -> Half {
        match self {
            F16Mode::Native => Half::Native,
            F16Mode::Packed => Half::Packed,
            F16Mode::Auto if native_runs => Half::Native,
            F16Mode::Auto => Half::Packed,
        }
    }
}

/// A device and queue with the limits the kernels must honour, and the compiled kernels.
/// Cloning is cheap: wgpu handles are reference counted and the kernel cache is shared.
#[derive(Clone)]
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    /// The device's limits (not the adapter's: a host application may have asked for less).
    pub limits: wgpu::Limits,
    /// Whether the device has SHADER_F16 enabled (the native f16 form may be used).
    pub has_f16: bool,
    /// How the shaders read f16 values. Set it only to a form the device supports
    /// ([`GpuContext::set_half`] checks).
    pub half: Half,
    /// Work decomposition chosen for this adapter.
    pub tuning: Tuning,
    kernels: Arc<Mutex<HashMap<String, Arc<Kernel>>>>,
}

/// How kernels split their work on this adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Invocations that share one row of a matvec (or one neuron of the sparse FFN), summed in
    /// workgroup memory: a power of two dividing 64. 16 on GPUs; 1 on CPU adapters (lavapipe),
    /// where a workgroup barrier is expensive (measured at SmolLM2's lm_head, 49152 x 576 Q8_0:
    /// 163 ms with 16 lanes, see `examples/gpu_timings.rs`).
    pub lanes: u32,
}

impl Tuning {
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> Tuning {
        let lanes = match info.device_type {
            wgpu::DeviceType::Cpu => 1,
            _ => 16,
        };
        Tuning { lanes }
    }
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl GpuContext {
    /// Opens a device. The instance honours `WGPU_BACKEND` and the other wgpu environment
    /// variables; the device gets every limit the adapter offers (the defaults cap storage
    /// bindings at 128 MiB and buffers at 256 MiB, less than many adapters allow).
    ///
    /// Without `WGPU_BACKEND` or [`GpuOptions::backends`], OpenGL is tried only when no primary
    /// backend has a usable adapter. An instance with the GL backend opens an EGL context at
    /// once, and on Mesa that context's software rasteriser starts threads that can still be
    /// running when the process exits. On this project's machine, 2 of 200 runs (four at a
    /// time, on lavapipe) crashed in `exit` with "double free or corruption" while the GL
    /// backend was enabled next to Vulkan, and none of 200 without it.
    pub fn new(opts: &GpuOptions) -> Result<GpuContext, GpuError> {
        if opts.backends.is_some() || wgpu::Backends::from_env().is_some() {
            return Self::open(opts, opts.backends);
        }
        match Self::open(opts, Some(wgpu::Backends::PRIMARY)) {
            Err(GpuError::NoAdapter { .. } | GpuError::AdapterNotFound { .. }) => {
                Self::open(opts, None)
            }
            opened => opened,
        }
    }

    /// [`GpuContext::new`] over `backends` (`None`: wgpu's default, from the environment).
    fn open(opts: &GpuOptions, backends: Option<wgpu::Backends>) -> Result<GpuContext, GpuError> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if let Some(b) = backends {
            desc.backends = b;
        }
        let backends = desc.backends;
        let instance = wgpu::Instance::new(desc);
        let adapter = match &opts.adapter {
            Some(wanted) => {
                let all = pollster::block_on(instance.enumerate_adapters(backends));
                let needle = wanted.to_lowercase();
                let names: Vec<String> = all
                    .iter()
                    .map(|a| {
                        let i = a.get_info();
                        format!("{} ({:?})", i.name, i.backend)
                    })
                    .collect();
                if all.is_empty() {
                    return Err(GpuError::NoAdapter {
                        detail: format!(" (looking for `{wanted}`)"),
                    });
                }
                all.into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&needle))
                    .ok_or_else(|| GpuError::AdapterNotFound {
                        wanted: wanted.clone(),
                        available: names.join(", "),
                    })?
            }
            None => pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                force_fallback_adapter: false,
                compatible_surface: None,
                apply_limit_buckets: false,
            }))
            .map_err(|e| GpuError::NoAdapter {
                detail: format!(" ({e})"),
            })?,
        };
        let info = adapter.get_info();
        // SHADER_F16 is enabled wherever offered, so that the form can still be changed
        // (GpuContext::set_half) whatever was chosen at first.
        let features =
            adapter.features() & (wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SHADER_F16);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("llmflash"),
            // Timestamps, where offered, give the GPU's own execution time (backend::gpu::timer).
            required_features: features,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| GpuError::RequestDevice {
            adapter: info.name.clone(),
            reason: e.to_string(),
        })?;
        let mut ctx = GpuContext::from_device(device, queue, info);
        // An explicit native choice where the device cannot run it is refused by set_half.
        ctx.set_half(opts.f16.resolve(ctx.native_runs()))?;
        log::info!("GPU: {}", ctx.describe());
        Ok(ctx)
    }

    /// Wraps a host application's device and queue (e.g. a game engine's), so the model shares
    /// its GPU. `info` is the adapter's, for messages. The f16 form is [`F16Mode::Auto`]'s choice
    /// for the features the host enabled (native needs SHADER_F16 on the device); change it with
    /// [`GpuContext::set_half`].
    pub fn from_device(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
    ) -> GpuContext {
        let limits = device.limits();
        let has_f16 = device.features().contains(wgpu::Features::SHADER_F16);
        let tuning = Tuning::for_adapter(&info);
        let mut ctx = GpuContext {
            tuning,
            device,
            queue,
            info,
            limits,
            has_f16,
            half: Half::Packed,
            kernels: Arc::new(Mutex::new(HashMap::new())),
        };
        ctx.half = F16Mode::Auto.resolve(ctx.native_runs());
        ctx
    }

    /// Whether the native f16 form can run here: SHADER_F16 enabled, and room for its extra
    /// storage bindings.
    pub fn native_runs(&self) -> bool {
        self.has_f16 && native_fits(&self.limits)
    }

    /// Chooses how the shaders read f16 values; the native form needs SHADER_F16 on the device.
    /// Kernels compiled before are kept (the cache is keyed by form).
    pub fn set_half(&mut self, half: Half) -> Result<(), GpuError> {
        if half == Half::Native && !self.has_f16 {
            return Err(GpuError::RequestDevice {
                adapter: self.info.name.clone(),
                reason: "the native f16 form needs the SHADER_F16 feature, which this device does not have (the adapter does not offer it, or a host application did not enable it); use the packed form (or let the backend choose)".to_string(),
            });
        }
        if half == Half::Native && !native_fits(&self.limits) {
            return Err(GpuError::RequestDevice {
                adapter: self.info.name.clone(),
                reason: format!(
                    "the native f16 form binds up to {NATIVE_STORAGE_BUFFERS} storage buffers per kernel, but the device allows {}; raise max_storage_buffers_per_shader_stage or use the packed form",
                    self.limits.max_storage_buffers_per_shader_stage
                ),
            });
        }
        self.half = half;
        Ok(())
    }

    /// The adapter in words, e.g. "llvmpipe (LLVM 15.0.6, 256 bits), Cpu, Vulkan, ...".
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}), max storage binding {} MiB, f16 {}",
            self.info.name,
            self.info.device_type,
            self.info.backend,
            self.max_binding() >> 20,
            self.half.name()
        )
    }

    /// The largest buffer one storage binding may cover (and one buffer may be).
    pub fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// The compiled kernel `name` (entry point `entry`) with its override constants, compiled on
    /// first use and cached for the context's lifetime.
    pub fn kernel(
        &self,
        name: &str,
        entry: &str,
        bindings: &[Binding],
        constants: &[(&str, f64)],
    ) -> Result<Arc<Kernel>, GpuError> {
        let key = format!("{name}:{entry}:{:?}:{constants:?}", self.half);
        // A poisoned lock only means another thread panicked mid-insert; the map is still valid.
        let mut cache = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(&key) {
            return Ok(k.clone());
        }
        let k = Arc::new(Kernel::new(self, name, entry, bindings, constants)?);
        cache.insert(key, k.clone());
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::gpu::buffers::{read, storage_f32};
    use crate::backend::gpu::kernels::add::add;
    use crate::backend::gpu::pipeline::submit;
    use crate::backend::gpu::testing::ctx;

    #[test]
    fn a_host_applications_device_runs_the_kernels() {
        let Some(engine) = ctx() else { return };
        // As a host application would: its own device and queue, handed over.
        let host = GpuContext::from_device(
            engine.device.clone(),
            engine.queue.clone(),
            engine.info.clone(),
        );
        assert_eq!(host.limits, engine.device.limits());
        assert!(host.max_binding() >= 1 << 20);
        let x = storage_f32(&host, "x", &[1.0, 2.0, 3.0]).unwrap();
        let y = storage_f32(&host, "y", &[10.0, 20.0, 30.0]).unwrap();
        submit(&host, &[add(&host, 3, &x, &y).unwrap()]);
        let got: Vec<f32> = read(&host, &y, 3).unwrap();
        assert_eq!(got, [11.0, 22.0, 33.0]);
    }

    #[test]
    fn an_unknown_adapter_name_lists_the_adapters() {
        if ctx().is_none() {
            return;
        }
        let opts = GpuOptions {
            adapter: Some("no-such-adapter-xyz".to_string()),
            ..Default::default()
        };
        match GpuContext::new(&opts) {
            Err(GpuError::AdapterNotFound { wanted, available }) => {
                assert_eq!(wanted, "no-such-adapter-xyz");
                assert!(!available.is_empty());
            }
            other => panic!("expected AdapterNotFound, got {other:?}"),
        }
    }

    #[test]
    fn the_f16_form_follows_the_feature() {
        assert_eq!(F16Mode::Auto.resolve(true), Half::Native);
        assert_eq!(F16Mode::Auto.resolve(false), Half::Packed);
        assert_eq!(F16Mode::Packed.resolve(true), Half::Packed);
        assert_eq!(F16Mode::Native.resolve(false), Half::Native);
        let Some(c) = ctx() else { return };
        let mut without = c.clone();
        without.has_f16 = false;
        let e = without
            .set_half(Half::Native)
            .expect_err("native without SHADER_F16");
        assert!(e.to_string().contains("SHADER_F16"), "{e}");
        assert!(without.set_half(Half::Packed).is_ok());
        let mut small = c.clone();
        small.limits.max_storage_buffers_per_shader_stage = NATIVE_STORAGE_BUFFERS - 1;
        if small.has_f16 {
            let e = small
                .set_half(Half::Native)
                .expect_err("too few storage buffers");
            assert!(e.to_string().contains("packed form"), "{e}");
        }
    }

    #[test]
    fn oversized_bindings_are_refused_with_a_message() {
        let Some(c) = ctx() else { return };
        let mut small = c.clone();
        small.limits.max_storage_buffer_binding_size = 1024;
        let e = crate::backend::gpu::buffers::storage_zeroed(&small, "KV cache", 4096)
            .expect_err("4 KiB in a 1 KiB binding");
        assert!(
            matches!(e, GpuError::TooLarge { .. }) && e.to_string().contains("smaller context"),
            "{e}"
        );
    }

    #[test]
    fn tuning_follows_the_device_type() {
        let Some(c) = ctx() else { return };
        let mut info = c.info.clone();
        info.device_type = wgpu::DeviceType::Cpu;
        assert_eq!(Tuning::for_adapter(&info).lanes, 1);
        info.device_type = wgpu::DeviceType::DiscreteGpu;
        assert_eq!(Tuning::for_adapter(&info).lanes, 16);
    }
}
