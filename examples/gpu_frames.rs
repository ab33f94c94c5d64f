//! A host application that owns its wgpu device, renders a frame offscreen every iteration (a
//! compute pass drawing an animated pattern into a storage texture), and between frames
//! generates tokens on the same device through `GpuContext::from_device`, keeping the time
//! generation spends per frame under a slice given on the command line.
//!
//!     cargo run --release --example gpu_frames -- MODEL [--frames 120] [--slice-ms 8]
//!         [--prompt "Once upon a time"] [--size 256] [--ppm last-frame.ppm] [--vram-mib 48]
//!
//! MODEL is a GGUF file, an HF directory or a flash image (the flash path streams bundles from
//! the SSD into GPU windows, planned under `--vram-mib` when given). The engine comes from the
//! library's facade (`Engine::builder(..).gpu(..).vram_budget(..)`, then
//! `Engine::gpu_decoder` for a decoder the frame loop steps). Scheduling: each frame adds the slice to a credit; tokens run
//! while the credit covers the expected cost of one (a running average of measured token
//! times, submit to readback), and each token's time is taken from the credit. With a slice
//! shorter than one token, tokens run every few frames and the average per frame stays under
//! the slice; one token is the smallest unit (a decode step is not split across frames).
//!
//! On lavapipe (no GPU) the "GPU" is the CPU: frame and token times are a CPU's emulating a
//! GPU.

use std::path::PathBuf;
use std::time::Instant;

use llmflash::api::Engine;
use llmflash::backend::gpu::GpuContext;
use llmflash::engine::sampler::argmax;

const SHADER: &str = r#"
struct Frame { t: f32, size: u32, _p0: u32, _p1: u32 }
@group(0) @binding(0) var<uniform> F: Frame;
@group(0) @binding(1) var img: texture_storage_2d<rgba8unorm, write>;

@compute @workgroup_size(8, 8)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    if (id.x >= F.size || id.y >= F.size) { return; }
    let p = vec2<f32>(id.xy) / f32(F.size) * 8.0;
    let v = sin(p.x + F.t) + sin(p.y * 1.3 - F.t * 0.7) + sin((p.x + p.y) * 0.7 + F.t * 1.1);
    let c = vec3<f32>(0.5 + 0.5 * sin(v), 0.5 + 0.5 * sin(v + 2.1), 0.5 + 0.5 * sin(v + 4.2));
    textureStore(img, vec2<i32>(id.xy), vec4<f32>(c, 1.0));
}
"#;

struct Args {
    model: PathBuf,
    frames: usize,
    slice_ms: f64,
    prompt: String,
    size: u32,
    ppm: Option<PathBuf>,
    vram_budget: Option<u64>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        model: PathBuf::new(),
        frames: 120,
        slice_ms: 8.0,
        prompt: "Once upon a time".into(),
        size: 256,
        ppm: None,
        vram_budget: None,
    };
    let mut model = None;
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--frames" => a.frames = value()?.parse().map_err(|e| format!("--frames: {e}"))?,
            "--slice-ms" => {
                a.slice_ms = value()?.parse().map_err(|e| format!("--slice-ms: {e}"))?
            }
            "--prompt" => a.prompt = value()?,
            "--size" => a.size = value()?.parse().map_err(|e| format!("--size: {e}"))?,
            "--ppm" => a.ppm = Some(value()?.into()),
            "--vram-mib" => {
                let mib: u64 = value()?.parse().map_err(|e| format!("--vram-mib: {e}"))?;
                a.vram_budget = Some(mib << 20);
            }
            _ if model.is_none() && !arg.starts_with("--") => model = Some(arg.into()),
            _ => return Err(format!("unknown argument {arg}")),
        }
    }
    a.model = model.ok_or("usage: gpu_frames MODEL [--frames N] [--slice-ms MS] [--prompt TEXT] [--size PX] [--ppm FILE] [--vram-mib MIB]")?;
    Ok(a)
}

/// The host's renderer: a storage texture, its pipeline, and a buffer to read the last frame.
struct Renderer {
    texture: wgpu::Texture,
    pipeline: wgpu::ComputePipeline,
    bind: wgpu::BindGroup,
    frame: wgpu::Buffer,
    size: u32,
}

impl Renderer {
    fn new(device: &wgpu::Device, size: u32) -> Renderer {
        let texture = device.create_texture(&wgpu::TextureDescriptor {
            label: Some("frame"),
            size: wgpu::Extent3d {
                width: size,
                height: size,
                depth_or_array_layers: 1,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba8Unorm,
            usage: wgpu::TextureUsages::STORAGE_BINDING | wgpu::TextureUsages::COPY_SRC,
            view_formats: &[],
        });
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("frame"),
            source: wgpu::ShaderSource::Wgsl(SHADER.into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("frame"),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        });
        let frame = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("frame uniform"),
            size: 16,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let view = texture.create_view(&Default::default());
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("frame"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: frame.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: wgpu::BindingResource::TextureView(&view),
                },
            ],
        });
        Renderer {
            texture,
            pipeline,
            bind,
            frame,
            size,
        }
    }

    /// Renders frame `i` and waits for it.
    fn render(&self, device: &wgpu::Device, queue: &wgpu::Queue, i: usize) {
        let u: [u32; 4] = [(i as f32 * 0.05).to_bits(), self.size, 0, 0];
        queue.write_buffer(&self.frame, 0, bytemuck::cast_slice(&u));
        let mut enc = device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &self.bind, &[]);
            let g = self.size.div_ceil(8);
            pass.dispatch_workgroups(g, g, 1);
        }
        queue.submit([enc.finish()]);
        let _ = device.poll(wgpu::PollType::wait_indefinitely());
    }

    /// Reads the texture back and writes it as a binary PPM.
    fn save_ppm(&self, device: &wgpu::Device, queue: &wgpu::Queue, path: &PathBuf) {
        let row = (self.size * 4).next_multiple_of(256);
        let buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("frame readback"),
            size: (row * self.size) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = device.create_command_encoder(&Default::default());
        enc.copy_texture_to_buffer(
            self.texture.as_image_copy(),
            wgpu::TexelCopyBufferInfo {
                buffer: &buf,
                layout: wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some(row),
                    rows_per_image: None,
                },
            },
            self.texture.size(),
        );
        queue.submit([enc.finish()]);
        buf.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        let _ = device.poll(wgpu::PollType::wait_indefinitely());
        let Ok(view) = buf.slice(..).get_mapped_range() else {
            eprintln!("could not read the frame back");
            return;
        };
        let mut out = format!("P6\n{} {}\n255\n", self.size, self.size).into_bytes();
        for y in 0..self.size as usize {
            let line = &view[y * row as usize..][..self.size as usize * 4];
            line.chunks_exact(4)
                .for_each(|p| out.extend_from_slice(&p[..3]));
        }
        match std::fs::write(path, out) {
            Ok(()) => println!("last frame written to {}", path.display()),
            Err(e) => eprintln!("writing {}: {e}", path.display()),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = parse()?;
    // The host's own device, as a game engine would create it.
    // Vulkan, Metal or DX12 unless WGPU_BACKEND says otherwise: a GL backend enabled next to
    // them opens an EGL context whose threads can outlive `main` (see GpuContext::new).
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
    let instance = wgpu::Instance::new(desc);
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        apply_limit_buckets: false,
    }))?;
    let info = adapter.get_info();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("host"),
        // The engine reads f16 natively where the host's device has SHADER_F16 enabled.
        required_features: adapter.features() & wgpu::Features::SHADER_F16,
        required_limits: adapter.limits(),
        ..Default::default()
    }))?;
    let renderer = Renderer::new(&device, a.size);
    let gpu = GpuContext::from_device(device.clone(), queue.clone(), info.clone());
    println!("device: {}", gpu.describe());
    if info.device_type == wgpu::DeviceType::Cpu {
        println!("note: this adapter is a CPU emulating a GPU: the times below are a CPU's");
    }

    // The engine on the host's device: the facade plans the GPU windows under the VRAM
    // budget for a flash image (bundles streamed from the SSD), as `generate --backend gpu
    // --vram-budget` does.
    let mut builder = Engine::builder(&a.model).gpu(gpu);
    if let Some(bytes) = a.vram_budget {
        builder = builder.vram_budget(bytes);
    }
    let engine = builder.context(1 << 16).build()?;
    let prompt = match &engine.model().tokenizer {
        Some(t) => t.encode(&a.prompt, true, false),
        None => vec![1, 2, 3],
    };
    let ctx = prompt.len() + a.frames * 8 + 8;
    let mut target = engine.gpu_decoder(ctx)?;
    let dec = target.model();

    let slice = a.slice_ms;
    let mut credit = 0.0f64;
    let mut estimate: Option<f64> = None;
    let mut fed = 0usize;
    let mut next = 0u32;
    let mut generated = Vec::new();
    let (mut render_total, mut gen_total, mut gen_max) = (0.0f64, 0.0f64, 0.0f64);
    let t_all = Instant::now();
    for frame in 0..a.frames {
        let t = Instant::now();
        renderer.render(&device, &queue, frame);
        render_total += t.elapsed().as_secs_f64() * 1e3;

        // Generation between this frame and the next, within the credit.
        credit = (credit + slice).min(slice.max(estimate.unwrap_or(0.0)));
        let mut spent = 0.0;
        while credit >= estimate.unwrap_or(0.0) && dec.position() < dec.capacity() {
            let t = Instant::now();
            if fed < prompt.len() {
                let logits = dec.step(prompt[fed])?;
                fed += 1;
                if fed == prompt.len() {
                    next = argmax(logits);
                }
            } else {
                generated.push(next);
                next = dec.step_greedy(next)?;
            }
            let dt = t.elapsed().as_secs_f64() * 1e3;
            estimate = Some(estimate.map_or(dt, |e| 0.8 * e + 0.2 * dt));
            credit -= dt;
            spent += dt;
            if estimate.is_some_and(|e| e > slice) {
                break;
            }
        }
        gen_total += spent;
        gen_max = gen_max.max(spent);
    }
    let wall = t_all.elapsed().as_secs_f64() * 1e3;
    match &engine.model().tokenizer {
        Some(t) => println!("{}{}", a.prompt, t.decode(&generated)),
        None => println!("(no tokenizer) prompt ids {prompt:?}, generated ids {generated:?}"),
    }
    println!(
        "{} frames in {:.0} ms ({:.1} fps): render {:.2} ms/frame; generation {:.2} ms/frame on average, {:.2} ms at most (slice {slice} ms); {} prompt + {} generated tokens, {:.2} ms per token",
        a.frames,
        wall,
        a.frames as f64 * 1e3 / wall,
        render_total / a.frames as f64,
        gen_total / a.frames as f64,
        gen_max,
        fed,
        generated.len(),
        estimate.unwrap_or(0.0),
    );
    if estimate.is_some_and(|e| e > slice) {
        println!("note: one token takes longer than the slice; tokens ran every few frames");
    }
    if let Some(p) = &a.ppm {
        renderer.save_ppm(&device, &queue, p);
    }
    Ok(())
}
