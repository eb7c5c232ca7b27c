//! Feature maps held in row bands, for images whose activations outgrow one device buffer.
//!
//! The VAE decoder's last levels hold `[N, 128..512, H, W]` maps at full image size: at
//! 2048x2048 one of them is 2 to 4 GiB, over the largest buffer many adapters allocate. A
//! [`RowBands`] keeps such a map as bands of rows, each an ordinary tensor, and computes
//! exactly what the whole tensor would give: a convolution reads its halo rows from the
//! neighbouring bands, and a group norm merges every band's mean and variance (Chan's
//! formula) before normalising. The blocks are written once against [`FeatureMap`], which a
//! whole [`Tensor`] implements too.

use crate::error::{Error, Result};
use crate::model::nn::{Conv2d, GroupNorm};
use crate::tensor::params::Padding2d;
use crate::tensor::Tensor;

/// What a convolutional block needs of its `[N, C, H, W]` input.
pub trait FeatureMap: Clone {
    /// The convolution, taking the map so that row bands nothing else holds are freed as
    /// the output grows (the peak is then about the larger of input and output, not their
    /// sum); a caller that needs the map afterwards passes a clone.
    fn conv(self, conv: &Conv2d) -> Result<Self>;
    /// Group norm, followed by SiLU when `silu`. This and the sums take the map so that a
    /// map nothing else holds is overwritten rather than copied (see
    /// [`Tensor::group_norm`]): the decoder's full-size maps are up to 1 GiB each.
    fn group_norm(self, norm: &GroupNorm, silu: bool) -> Result<Self>;
    fn add(self, other: &Self) -> Result<Self>;
    /// Adds a `[N, C, 1, 1]` tensor (a per-channel bias) everywhere.
    fn add_per_channel(self, bias: &Tensor) -> Result<Self>;
    fn scale(&self, factor: f32) -> Result<Self>;
    /// Nearest-neighbour resize to `height x width`, then the convolution (`Upsample2D`),
    /// taking the map so that it is freed as the resized one is convolved.
    fn upsample_conv(self, height: usize, width: usize, conv: &Conv2d) -> Result<Self>;
    /// The first half of a ResNet block: `conv(silu(norm(x)))`, and the shortcut
    /// `shortcut(x)` (`x` itself when there is no shortcut convolution), both reading the
    /// map it takes.
    fn resnet_entry(
        self,
        norm: &GroupNorm,
        conv: &Conv2d,
        shortcut: Option<&Conv2d>,
    ) -> Result<(Self, Self)>;
    /// A stride-2 convolution of the map with one zero row and column after it (diffusers'
    /// `Downsample2D` with `padding=0`, the VAE encoder's).
    fn downsample_padded_after(&self, conv: &Conv2d) -> Result<Self>;
    /// `[N, C, H, W]`.
    fn dims(&self) -> [usize; 4];
}

impl FeatureMap for Tensor {
    fn conv(self, conv: &Conv2d) -> Result<Self> {
        conv.forward(&self)
    }

    fn group_norm(self, norm: &GroupNorm, silu: bool) -> Result<Self> {
        if silu {
            norm.forward_silu(self)
        } else {
            norm.forward(self)
        }
    }

    fn add(self, other: &Self) -> Result<Self> {
        self.add_owned(other)
    }

    fn add_per_channel(self, bias: &Tensor) -> Result<Self> {
        self.add_owned(bias)
    }

    fn scale(&self, factor: f32) -> Result<Self> {
        Tensor::scale(self, factor)
    }

    fn upsample_conv(self, height: usize, width: usize, conv: &Conv2d) -> Result<Self> {
        let resized = self.upsample_nearest(height, width)?;
        drop(self);
        conv.forward(&resized)
    }

    /// The shortcut comes first: after it only the norm reads `x`, and normalises it in
    /// place when nothing else holds it (see `ResnetBlock2D::forward`).
    fn resnet_entry(
        self,
        norm: &GroupNorm,
        conv: &Conv2d,
        shortcut: Option<&Conv2d>,
    ) -> Result<(Self, Self)> {
        let shortcut = match shortcut {
            Some(c) => c.forward(&self)?,
            None => self.clone(),
        };
        let h = FeatureMap::group_norm(self, norm, true)?.conv(conv)?;
        Ok((h, shortcut))
    }

    fn downsample_padded_after(&self, conv: &Conv2d) -> Result<Self> {
        self.expect_rank("Downsample2D", 4)?;
        conv.forward_padded(self, padded_after(1))
    }

    fn dims(&self) -> [usize; 4] {
        let s = self.shape();
        [s[0], s[1], s[2], s[3]]
    }
}

/// A `[N, C, H, W]` feature map as bands of consecutive rows (dimension 2).
#[derive(Clone)]
pub struct RowBands {
    bands: Vec<Tensor>,
}

impl RowBands {
    /// Splits `x` into `count` bands of nearly equal height (at most one per row).
    pub fn split(x: &Tensor, count: usize) -> Result<Self> {
        Self::split_aligned(x, count, 1)
    }

    /// [`RowBands::split`] into bands whose heights are multiples of `align` (which must
    /// divide the height), so that they halve evenly through `log2(align)` downsamplers.
    pub fn split_aligned(x: &Tensor, count: usize, align: usize) -> Result<Self> {
        x.expect_rank("RowBands", 4)?;
        let h = x.dim(2);
        if align == 0 || !h.is_multiple_of(align) {
            return Err(Error::shape(
                "RowBands::split_aligned",
                format!("{h} rows are not a multiple of {align}"),
            ));
        }
        let units = h / align;
        let count = count.clamp(1, units.max(1));
        let mut bands = Vec::with_capacity(count);
        let mut start = 0;
        for i in 0..count {
            let rows = (units / count + usize::from(i < units % count)) * align;
            bands.push(x.narrow(2, start, rows)?);
            start += rows;
        }
        Ok(RowBands { bands })
    }

    /// The whole map: the bands concatenated.
    pub fn join(&self) -> Result<Tensor> {
        match self.bands.as_slice() {
            [one] => Ok(one.clone()),
            bands => Tensor::cat(&bands.iter().collect::<Vec<_>>(), 2),
        }
    }

    pub fn bands(&self) -> &[Tensor] {
        &self.bands
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(RowBands {
            bands: self.bands.iter().map(f).collect::<Result<_>>()?,
        })
    }

    /// [`RowBands::map`] handing each band over, for ops that can overwrite it.
    fn map_owned(self, f: impl Fn(Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(RowBands {
            bands: self.bands.into_iter().map(f).collect::<Result<_>>()?,
        })
    }

    /// The whole map's `[N, groups, 2]` means and variances, from each band's.
    fn moments(&self, groups: usize) -> Result<Tensor> {
        let rows: usize = self.bands.iter().map(|b| b.dim(2)).sum();
        let parts = self
            .bands
            .iter()
            .map(|b| {
                let m = b.group_moments(groups)?;
                let weight = b.dim(2) as f32 / rows as f32;
                Ok((weight, m.narrow(2, 0, 1)?, m.narrow(2, 1, 1)?))
            })
            .collect::<Result<Vec<_>>>()?;
        // mean = sum w_i mean_i;  var = sum w_i (var_i + (mean_i - mean)^2)
        let mut mean = parts[0].1.scale(parts[0].0)?;
        for (w, m, _) in &parts[1..] {
            mean = Tensor::axpby(1.0, &mean, *w, m)?;
        }
        let mut var: Option<Tensor> = None;
        for (w, m, v) in &parts {
            let d = m.sub(&mean)?;
            let term = v.add(&d.mul(&d)?)?;
            var = Some(match var {
                None => term.scale(*w)?,
                Some(acc) => Tensor::axpby(1.0, &acc, *w, &term)?,
            });
        }
        let var = var.expect("a RowBands has at least one band");
        Tensor::cat(&[&mean, &var], 2)
    }
}

impl FeatureMap for RowBands {
    /// Band by band (see [`conv_stream`]), each input band dropped once its output is made.
    fn conv(self, conv: &Conv2d) -> Result<Self> {
        conv_stream(self.bands.into_iter().map(Ok), conv)
    }

    fn group_norm(self, norm: &GroupNorm, silu: bool) -> Result<Self> {
        if self.bands.len() == 1 {
            return self.map_owned(|b| FeatureMap::group_norm(b, norm, silu));
        }
        let moments = self.moments(norm.groups())?;
        // Each band is dropped as soon as its normalised copy is made.
        self.map_owned(|b| norm.forward_with_moments(&b, &moments, silu))
    }

    fn add(self, other: &Self) -> Result<Self> {
        if self.bands.len() != other.bands.len() {
            return Err(Error::shape(
                "RowBands::add",
                format!("{} bands and {} bands", self.bands.len(), other.bands.len()),
            ));
        }
        Ok(RowBands {
            bands: self
                .bands
                .into_iter()
                .zip(&other.bands)
                .map(|(a, b)| a.add_owned(b))
                .collect::<Result<_>>()?,
        })
    }

    fn add_per_channel(self, bias: &Tensor) -> Result<Self> {
        self.map_owned(|b| b.add_owned(bias))
    }

    fn scale(&self, factor: f32) -> Result<Self> {
        self.map(|b| b.scale(factor))
    }

    /// Each band resized by the same whole factor (so rows never cross a band boundary)
    /// just before it is convolved: at most two resized bands exist at once, and each input
    /// band is dropped as its resized copy is made.
    fn upsample_conv(self, height: usize, width: usize, conv: &Conv2d) -> Result<Self> {
        let [_, _, h, _] = self.dims();
        if h == 0 || !height.is_multiple_of(h) {
            return Err(Error::shape(
                "RowBands::upsample_conv",
                format!("{h} rows cannot grow to {height} by a whole factor"),
            ));
        }
        let factor = height / h;
        let resized = self
            .bands
            .into_iter()
            .map(|b| b.upsample_nearest(b.dim(2) * factor, width));
        conv_stream(resized, conv)
    }

    /// One pass over the bands: each band's shortcut and normalised copy are made and the
    /// band dropped (unless it is its own shortcut), and the convolution consumes the
    /// normalised bands as they come. The input shrinks as the two outputs grow, so the
    /// peak is about the larger of input and outputs rather than input plus shortcut plus
    /// convolution (at SDXL's 1024x1024 decode: 1 GiB, not 2).
    fn resnet_entry(
        self,
        norm: &GroupNorm,
        conv: &Conv2d,
        shortcut: Option<&Conv2d>,
    ) -> Result<(Self, Self)> {
        let moments = self.moments(norm.groups())?;
        let mut shortcuts = Vec::with_capacity(self.bands.len());
        let normalised = self.bands.into_iter().map(|band| {
            let normalised = norm.forward_with_moments(&band, &moments, true)?;
            shortcuts.push(match shortcut {
                Some(c) => c.forward(&band)?,
                None => band,
            });
            Ok(normalised)
        });
        let h = conv_stream(normalised, conv)?;
        Ok((h, RowBands { bands: shortcuts }))
    }

    /// Output row r reads input rows 2r..2r+2, so each band (of even height) takes the
    /// first row of the band below it, or the zero row where the map ends.
    fn downsample_padded_after(&self, conv: &Conv2d) -> Result<Self> {
        let last = self.bands.len() - 1;
        let mut out = Vec::with_capacity(self.bands.len());
        for (i, band) in self.bands.iter().enumerate() {
            let rows = band.dim(2);
            if rows % 2 != 0 {
                return Err(Error::shape(
                    "RowBands::downsample_padded_after",
                    format!("a band of {rows} rows does not halve"),
                ));
            }
            out.push(if i < last {
                let below = self.bands[i + 1].narrow(2, 0, 1)?;
                conv.forward_padded(&Tensor::cat(&[band, &below], 2)?, padded_after(0))?
            } else {
                conv.forward_padded(band, padded_after(1))?
            });
        }
        Ok(RowBands { bands: out })
    }

    fn dims(&self) -> [usize; 4] {
        let [n, c, _, w] = self.bands[0].dims();
        [n, c, self.bands.iter().map(|b| b.dim(2)).sum(), w]
    }
}

/// One zero column after the map, and `rows` zero rows after it.
fn padded_after(rows: usize) -> Padding2d {
    Padding2d {
        top: 0,
        bottom: rows,
        left: 0,
        right: 1,
    }
}

/// A size-preserving convolution of consecutive row bands, made one at a time as `bands`
/// yields them: each band is convolved with `padding` rows of its neighbours and zero rows
/// only where the whole map ends (so no output row is computed twice), and dropped once its
/// output is made, keeping its last rows for the next band's halo. Only the band
/// after the current one is read ahead, so a stream that makes its bands as it goes (a
/// resize, a norm) holds at most two of them.
fn conv_stream(mut bands: impl Iterator<Item = Result<Tensor>>, conv: &Conv2d) -> Result<RowBands> {
    if !conv.keeps_size() {
        return Err(Error::shape(
            "RowBands::conv",
            "only size-preserving convolutions run on row bands".to_string(),
        ));
    }
    let halo = conv.padding();
    let mut out = Vec::new();
    let mut next = bands.next().transpose()?;
    // The previous band's last `halo` rows (a copy: the band itself is gone).
    let mut above: Option<Tensor> = None;
    while let Some(band) = next.take() {
        next = bands.next().transpose()?;
        let below = match &next {
            Some(next) => halo_rows(next, halo, false)?,
            None => None,
        };
        let next_above = match &next {
            Some(_) => halo_rows(&band, halo, true)?,
            None => None,
        };
        // Zero rows only where the whole map ends: the output has the band's rows.
        let padding = Padding2d {
            top: if above.is_some() { 0 } else { halo },
            bottom: if below.is_some() { 0 } else { halo },
            ..Padding2d::uniform(halo)
        };
        let input = if above.is_none() && below.is_none() {
            band
        } else {
            let with_halo = {
                let parts: Vec<&Tensor> = above.iter().chain([&band]).chain(below.iter()).collect();
                Tensor::cat(&parts, 2)?
            };
            drop(band);
            with_halo
        };
        out.push(conv.forward_padded(&input, padding)?);
        drop(input);
        above = next_above;
    }
    if out.is_empty() {
        return Err(Error::shape("RowBands::conv", "no bands".to_string()));
    }
    Ok(RowBands { bands: out })
}

/// The last (`from_end`) or first `halo` rows of a neighbouring band.
fn halo_rows(band: &Tensor, halo: usize, from_end: bool) -> Result<Option<Tensor>> {
    if halo == 0 {
        return Ok(None);
    }
    let rows = band.dim(2);
    if rows < halo {
        return Err(Error::shape(
            "RowBands::conv",
            format!("a band of {rows} rows cannot lend a halo of {halo}"),
        ));
    }
    let start = if from_end { rows - halo } else { 0 };
    band.narrow(2, start, halo).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::Weights;
    use crate::tensor::testing::random;
    use crate::tensor::Device;

    /// Every op on uneven bands (4, 3, 3, 3 rows) against the whole tensor, on the CPU and
    /// on the test GPU.
    #[test]
    fn ops_on_row_bands_equal_the_whole_map() {
        let mut devices = vec![Device::Cpu];
        devices.extend(crate::backend::gpu::test_device().map(Device::Gpu));
        for device in devices {
            let w = Weights::random(5, &device);
            let conv = Conv2d::new(&w.pp("conv"), 8, 6, 3, 1, 1).unwrap();
            let norm = GroupNorm::new(&w.pp("norm"), 4, 8, 1e-6).unwrap();
            let x = random(&[2, 8, 13, 5], 1)
                .affine(0.7, 2.0)
                .unwrap()
                .to_device(&device)
                .unwrap();
            let bands = RowBands::split(&x, 4).unwrap();
            assert_eq!(
                bands.bands().iter().map(|b| b.dim(2)).collect::<Vec<_>>(),
                [4, 3, 3, 3]
            );
            let check = |what: &str, banded: RowBands, whole: Tensor| {
                let (got, want) = (
                    banded.join().unwrap().to_vec().unwrap(),
                    whole.to_vec().unwrap(),
                );
                crate::tensor::testing::assert_close(&format!("{what} on {device}"), &got, &want);
            };
            check(
                "conv",
                bands.clone().conv(&conv).unwrap(),
                conv.forward(&x).unwrap(),
            );
            for silu in [false, true] {
                check(
                    "group norm",
                    FeatureMap::group_norm(bands.clone(), &norm, silu).unwrap(),
                    FeatureMap::group_norm(x.clone(), &norm, silu).unwrap(),
                );
            }
            let square = Conv2d::new(&w.pp("square"), 8, 8, 3, 1, 1).unwrap();
            check(
                "upsample and convolution",
                bands.clone().upsample_conv(26, 10, &square).unwrap(),
                x.clone().upsample_conv(26, 10, &square).unwrap(),
            );
            let shortcut = Conv2d::new(&w.pp("shortcut"), 8, 6, 1, 1, 0).unwrap();
            for shortcut in [None, Some(&shortcut)] {
                let (banded, banded_shortcut) =
                    bands.clone().resnet_entry(&norm, &conv, shortcut).unwrap();
                let (whole, whole_shortcut) =
                    x.clone().resnet_entry(&norm, &conv, shortcut).unwrap();
                check("ResNet entry", banded, whole);
                check("ResNet shortcut", banded_shortcut, whole_shortcut);
            }
            check(
                "add",
                FeatureMap::add(bands.clone(), &bands).unwrap(),
                Tensor::add(&x, &x).unwrap(),
            );
            // Even bands (4, 4, 2, 2 of 12 rows) through the encoder's downsampler.
            let down = Conv2d::new(&w.pp("down"), 8, 8, 3, 2, 0).unwrap();
            let even = x.narrow(2, 0, 12).unwrap();
            let even_bands = RowBands::split_aligned(&even, 4, 2).unwrap();
            assert_eq!(
                even_bands
                    .bands()
                    .iter()
                    .map(|b| b.dim(2))
                    .collect::<Vec<_>>(),
                [4, 4, 2, 2]
            );
            check(
                "downsample",
                even_bands.downsample_padded_after(&down).unwrap(),
                even.downsample_padded_after(&down).unwrap(),
            );
            assert_eq!(bands.dims(), [2, 8, 13, 5]);
        }
    }
}
