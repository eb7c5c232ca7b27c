//! The CPU backend's ops against naive reference loops, on awkward shapes (sizes that are
//! not multiples of any block, batch 1 and 2, odd channel counts, causal masks).

use sd_wgpu::pipeline::noise::TorchRng;
use sd_wgpu::tensor::{Device, Tensor};

mod common;
use common::assert_close;

fn random(shape: &[usize], seed: u64) -> (Tensor, Vec<f32>) {
    let n: usize = shape.iter().product();
    let data = TorchRng::new(seed).randn(n.max(16))[..n].to_vec();
    (
        Tensor::from_vec(data.clone(), shape, &Device::Cpu).unwrap(),
        data,
    )
}

#[test]
fn matmul_and_linear_match_naive_products() {
    for &(b, m, k, n) in &[
        (1, 1, 1, 1),
        (2, 37, 19, 53),
        (1, 130, 257, 67),
        (3, 5, 300, 2),
    ] {
        let (a, av) = random(&[b, m, k], 1);
        let (w, wv) = random(&[b, k, n], 2);
        let mut expected = vec![0f64; b * m * n];
        for bi in 0..b {
            for i in 0..m {
                for j in 0..n {
                    expected[(bi * m + i) * n + j] = (0..k)
                        .map(|p| av[(bi * m + i) * k + p] as f64 * wv[(bi * k + p) * n + j] as f64)
                        .sum();
                }
            }
        }
        assert_close(
            "matmul",
            &a.matmul(&w).unwrap().to_vec().unwrap(),
            &expected,
            1e-5,
        );

        // linear: x [b*m, k] with weight [n, k] and bias.
        let (wt, wtv) = random(&[n, k], 3);
        let (bias, biasv) = random(&[n], 4);
        let mut expected = vec![0f64; b * m * n];
        for r in 0..b * m {
            for j in 0..n {
                expected[r * n + j] = biasv[j] as f64
                    + (0..k)
                        .map(|p| av[r * k + p] as f64 * wtv[j * k + p] as f64)
                        .sum::<f64>();
            }
        }
        let got = a.linear(&wt, Some(&bias)).unwrap();
        assert_eq!(got.shape(), &[b, m, n]);
        assert_close("linear", &got.to_vec().unwrap(), &expected, 1e-5);
    }
}

fn naive_conv(
    x: &[f32],
    xs: [usize; 4],
    w: &[f32],
    ws: [usize; 4],
    bias: &[f32],
    stride: usize,
    pad: usize,
) -> (Vec<f64>, [usize; 4]) {
    let [n, c, h, wd] = xs;
    let [oc, _, kh, kw] = ws;
    let oh = (h + 2 * pad - kh) / stride + 1;
    let ow = (wd + 2 * pad - kw) / stride + 1;
    let mut out = vec![0f64; n * oc * oh * ow];
    for b in 0..n {
        for o in 0..oc {
            for y in 0..oh {
                for xo in 0..ow {
                    let mut acc = bias[o] as f64;
                    for ci in 0..c {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (y * stride + ky) as isize - pad as isize;
                                let ix = (xo * stride + kx) as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy as usize >= h || ix as usize >= wd {
                                    continue;
                                }
                                acc += x[((b * c + ci) * h + iy as usize) * wd + ix as usize]
                                    as f64
                                    * w[((o * c + ci) * kh + ky) * kw + kx] as f64;
                            }
                        }
                    }
                    out[((b * oc + o) * oh + y) * ow + xo] = acc;
                }
            }
        }
    }
    (out, [n, oc, oh, ow])
}

#[test]
fn conv2d_matches_naive_convolution() {
    // (input shape, out channels, kernel, stride, padding)
    let cases = [
        ([1, 3, 7, 5], 5, 3, 1, 1),
        ([2, 4, 9, 6], 6, 3, 2, 1),
        ([2, 5, 4, 4], 3, 1, 1, 0),
        ([1, 2, 6, 7], 4, 3, 1, 0),
    ];
    for (i, &(xs, oc, k, stride, pad)) in cases.iter().enumerate() {
        let ws = [oc, xs[1], k, k];
        let (x, xv) = random(&xs, 10 + i as u64);
        let (w, wv) = random(&ws, 20 + i as u64);
        let (b, bv) = random(&[oc], 30 + i as u64);
        let (expected, shape) = naive_conv(&xv, xs, &wv, ws, &bv, stride, pad);
        let got = x.conv2d(&w, Some(&b), stride, pad).unwrap();
        assert_eq!(got.shape(), &shape);
        assert_close(
            &format!("conv2d case {i}"),
            &got.to_vec().unwrap(),
            &expected,
            1e-5,
        );
    }
}

#[test]
fn attention_matches_naive_softmax_attention() {
    // (batch, heads, q_len, kv_len, head_dim, causal); 300 queries cross a query block.
    let cases = [
        (1, 1, 3, 3, 4, false),
        (2, 3, 300, 77, 8, false),
        (1, 2, 77, 77, 5, true),
        (2, 1, 17, 130, 3, false),
    ];
    for (ci, &(b, h, lq, lk, d, causal)) in cases.iter().enumerate() {
        let inner = h * d;
        let (q, qv) = random(&[b, lq, inner], 40 + ci as u64);
        let (k, kv) = random(&[b, lk, inner], 50 + ci as u64);
        let (v, vv) = random(&[b, lk, inner], 60 + ci as u64);
        let mut expected = vec![0f64; b * lq * inner];
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..lq {
                    let visible = if causal { i + 1 } else { lk };
                    let scores: Vec<f64> = (0..visible)
                        .map(|j| {
                            (0..d)
                                .map(|x| {
                                    qv[(bi * lq + i) * inner + hi * d + x] as f64
                                        * kv[(bi * lk + j) * inner + hi * d + x] as f64
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = exps.iter().sum();
                    for x in 0..d {
                        expected[(bi * lq + i) * inner + hi * d + x] = (0..visible)
                            .map(|j| exps[j] / sum * vv[(bi * lk + j) * inner + hi * d + x] as f64)
                            .sum();
                    }
                }
            }
        }
        let got = Tensor::attention(&q, &k, &v, h, causal).unwrap();
        assert_close(
            &format!("attention case {ci}"),
            &got.to_vec().unwrap(),
            &expected,
            1e-5,
        );
    }
}

#[test]
fn group_norm_and_layer_norm_match_definitions() {
    let (x, xv) = random(&[2, 6, 5, 3], 70);
    let (g, gv) = random(&[6], 71);
    let (b, bv) = random(&[6], 72);
    for &(groups, silu) in &[(3usize, false), (2, true), (6, false)] {
        let per = 6 / groups * 15;
        let mut expected = vec![0f64; xv.len()];
        for slab in 0..2 * groups {
            let vals = &xv[slab * per..(slab + 1) * per];
            let mean = vals.iter().map(|&v| v as f64).sum::<f64>() / per as f64;
            let var = vals.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / per as f64;
            for (i, &v) in vals.iter().enumerate() {
                let ch = ((slab * per + i) / 15) % 6;
                let y = (v as f64 - mean) / (var + 1e-5).sqrt() * gv[ch] as f64 + bv[ch] as f64;
                expected[slab * per + i] = if silu { y / (1.0 + (-y).exp()) } else { y };
            }
        }
        let got = x.clone().group_norm(groups, &g, &b, 1e-5, silu).unwrap();
        assert_close("group_norm", &got.to_vec().unwrap(), &expected, 1e-5);
    }

    let (x, xv) = random(&[4, 7], 73);
    let (g, gv) = random(&[7], 74);
    let (b, bv) = random(&[7], 75);
    let mut expected = vec![0f64; 28];
    for r in 0..4 {
        let row = &xv[r * 7..(r + 1) * 7];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 7.0;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 7.0;
        for j in 0..7 {
            expected[r * 7 + j] =
                (row[j] as f64 - mean) / (var + 1e-5).sqrt() * gv[j] as f64 + bv[j] as f64;
        }
    }
    assert_close(
        "layer_norm",
        &x.layer_norm(&g, &b, 1e-5).unwrap().to_vec().unwrap(),
        &expected,
        1e-5,
    );
}

#[test]
fn layout_ops_move_the_right_elements() {
    let x = Tensor::from_vec(
        (0..24).map(|v| v as f32).collect(),
        &[2, 3, 4],
        &Device::Cpu,
    )
    .unwrap();
    let p = x.permute(&[2, 0, 1]).unwrap();
    assert_eq!(p.shape(), &[4, 2, 3]);
    let pv = p.to_vec().unwrap();
    assert_eq!(pv[0..6], [0.0, 4.0, 8.0, 12.0, 16.0, 20.0]);
    assert_eq!(
        x.narrow(1, 1, 2).unwrap().to_vec().unwrap()[..4],
        [4.0, 5.0, 6.0, 7.0]
    );
    let c = Tensor::cat(&[&x, &x.narrow(2, 0, 1).unwrap()], 2).unwrap();
    assert_eq!(c.shape(), &[2, 3, 5]);
    assert_eq!(c.to_vec().unwrap()[..5], [0.0, 1.0, 2.0, 3.0, 0.0]);

    // Nearest resize to a non-multiple size follows torch: src = floor(dst * in / out).
    let img = Tensor::from_vec(
        (0..6).map(|v| v as f32).collect(),
        &[1, 1, 2, 3],
        &Device::Cpu,
    )
    .unwrap();
    let up = img.upsample_nearest(3, 5).unwrap().to_vec().unwrap();
    assert_eq!(up[..5], [0.0, 0.0, 1.0, 1.0, 2.0]);
    assert_eq!(up[10..15], [3.0, 3.0, 4.0, 4.0, 5.0]);

    // Broadcasting a per-channel bias over an NCHW tensor.
    let bias = Tensor::from_vec(vec![10.0, 20.0, 30.0], &[1, 3, 1, 1], &Device::Cpu).unwrap();
    let sum = x
        .reshape(&[2, 3, 2, 2])
        .unwrap()
        .add(&bias)
        .unwrap()
        .to_vec()
        .unwrap();
    assert_eq!(sum[..5], [10.0, 11.0, 12.0, 13.0, 24.0]);
}

#[test]
fn geglu_and_activations_match_formulas() {
    let x = Tensor::from_vec(vec![1.0, -2.0, 0.5, 3.0], &[1, 4], &Device::Cpu).unwrap();
    let g = x.geglu().unwrap().to_vec().unwrap();
    let gelu = |v: f64| 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt()));
    assert_close("geglu", &g, &[gelu(0.5), -2.0 * gelu(3.0)], 1e-6);
    let q = x.quick_gelu().unwrap().to_vec().unwrap();
    let expected: Vec<f64> = [1.0f64, -2.0, 0.5, 3.0]
        .iter()
        .map(|v| v / (1.0 + (-1.702 * v).exp()))
        .collect();
    assert_close("quick_gelu", &q, &expected, 1e-6);
}

#[test]
fn shape_errors_are_reported_not_panicked() {
    let (a, _) = random(&[2, 3], 80);
    let (b, _) = random(&[4, 5], 81);
    assert!(a.matmul(&b).is_err());
    assert!(a.add(&b).is_err());
    assert!(a.reshape(&[7]).is_err());
    assert!(a.narrow(1, 2, 2).is_err());
    assert!(a.embedding(&[5]).is_err());
    assert!(a.permute(&[0, 0]).is_err());
}
