//! The CPU backend's opt-in `--precision bf16` (bf16 products, f32 sums): its own test
//! binary, because the precision is chosen once per process.

use std::process::Command;

use sd_wgpu::backend::cpu::precision::{self, set_precision, Precision};
use sd_wgpu::tensor::Device;

mod common;
use common::image_cases::{
    case_png, describe, diff_with_png, generate_case, load_model, model_key, read_cases,
};

/// How far a bf16 image may be from diffusers' float32 one, in levels of 255. Not the f32
/// pass rule (3 and 0.5): every product's operands lose 16 of their 24 bits. Measured over
/// these 23 cases on a 2-core Xeon (2026-12-07): worst max 28 (fast512 at 512x512) and worst
/// mean 2.10 with AMX, 20 and 2.07 with the AVX512_BF16 kernel (`SD_CPU_BF16=avx512`).
/// A broken product (a wrong panel, a dropped k pair) moves these images by tens of levels
/// on average.
const BF16_MAX_DIFF: u8 = 40;
const BF16_MEAN_DIFF: f64 = 3.0;

/// Every text-to-image case (all three fixture models, every scheduler) on the CPU with
/// bf16 products stays near diffusers' float32 image: the mode draws the same pictures,
/// only less exactly. Without bf16 instructions the mode is refused, naming them.
#[test]
fn bf16_images_stay_near_diffusers_float32_ones() {
    if precision::kernels().is_empty() {
        let e = set_precision(Precision::Bf16).unwrap_err().to_string();
        assert!(e.contains("AMX-BF16 or AVX512_BF16"), "{e}");
        eprintln!("no bf16 kernel here (no AMX-BF16 or AVX512_BF16, or SD_CPU_SIMD below avx512): only the refusal was checked");
        return;
    }
    set_precision(Precision::Bf16).unwrap();
    assert!(
        precision::current().starts_with("bf16"),
        "{}",
        precision::current()
    );

    let reference = common::reference("");
    let cases = read_cases(&reference, "images.json").unwrap();
    assert!(cases.len() >= 23, "only {} cases", cases.len());
    let mut models = std::collections::HashMap::new();
    let (mut worst_max, mut worst_mean, mut failures) = (0u8, 0f64, Vec::new());
    for (index, case) in cases.iter().enumerate() {
        let name = format!("{} in bf16", describe(index, case));
        let sd = models.entry(model_key(case)).or_insert_with(|| {
            load_model(case, &common::fixtures(), &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
        });
        let image = generate_case(sd, case, &reference, &name).unwrap_or_else(|e| panic!("{e}"));
        let png = case_png(case, &reference).unwrap();
        let (diff, _) = diff_with_png(&image, &png, &name).unwrap_or_else(|e| panic!("{e}"));
        println!("{name}: max diff {}, mean diff {:.4}", diff.max, diff.mean);
        worst_max = worst_max.max(diff.max);
        worst_mean = worst_mean.max(diff.mean);
        if diff.max > BF16_MAX_DIFF || diff.mean > BF16_MEAN_DIFF {
            failures.push(format!("{name}: max {} mean {:.4}", diff.max, diff.mean));
        }
    }
    println!(
        "bf16 ({}): worst max diff {worst_max}, worst mean {worst_mean:.4}",
        precision::current()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases beyond {BF16_MAX_DIFF} / {BF16_MEAN_DIFF}:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The command line refuses bf16 on the GPU backend (before looking for an adapter), and
/// on the CPU it draws the image where the CPU has bf16 instructions, else names them.
#[test]
fn the_command_line_takes_precision_for_the_cpu_only() {
    let dir = tempfile::tempdir().unwrap();
    let run = |backend: &str| {
        Command::new(env!("CARGO_BIN_EXE_sd-wgpu"))
            .args([
                "generate",
                "--backend",
                backend,
                "--precision",
                "bf16",
                "--model",
            ])
            .arg(common::model_dir("sd1"))
            .args([
                "--prompt",
                "a bf16 test",
                "--steps",
                "2",
                "--width",
                "32",
                "--height",
                "32",
            ])
            .args(["--seed", "1", "-o"])
            .arg(dir.path().join("out.png"))
            .env_remove("SD_PRECISION")
            .output()
            .unwrap()
    };
    let gpu = run("gpu");
    let stderr = String::from_utf8_lossy(&gpu.stderr);
    assert!(!gpu.status.success());
    assert!(
        stderr.contains("--precision bf16 is for the CPU backend"),
        "{stderr}"
    );

    let cpu = run("cpu");
    let stderr = String::from_utf8_lossy(&cpu.stderr);
    if precision::kernels().is_empty() {
        assert!(!cpu.status.success());
        assert!(stderr.contains("AMX-BF16 or AVX512_BF16"), "{stderr}");
    } else {
        assert!(cpu.status.success(), "{stderr}");
        let png = image::open(dir.path().join("out.png")).unwrap();
        assert_eq!((png.width(), png.height()), (32, 32));
        assert!(
            stderr.contains("bf16"),
            "the log names the precision: {stderr}"
        );
    }
}
