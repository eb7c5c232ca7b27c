//! Images in and out of the pipelines: decoding a user's PNG or JPEG, diffusers'
//! `VaeImageProcessor` for init images and masks, and the decoded latents back to 8-bit RGB.

use crate::error::{Error, Result};
use crate::tensor::{Device, Tensor};

/// An 8-bit RGB image, rows top to bottom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// An inpainting mask as 8-bit luminance, rows top to bottom: white repaints, black keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskImage {
    pub width: usize,
    pub height: usize,
    pub luma: Vec<u8>,
}

/// Reads the header of a PNG or JPEG and refuses images of more than `max_pixels` before
/// any pixel is decoded, so a small body cannot expand into gigabytes.
fn decode(bytes: &[u8], max_pixels: usize) -> Result<image::DynamicImage> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::InvalidArgument(format!("cannot read the image: {e}")))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg) => {}
        Some(other) => {
            return Err(Error::InvalidArgument(format!(
                "{other:?} images are not supported: send a PNG or JPEG"
            )))
        }
        None => {
            return Err(Error::InvalidArgument(
                "not a PNG or JPEG image".to_string(),
            ))
        }
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| Error::InvalidArgument(format!("cannot read the image: {e}")))?;
    let pixels = w as usize * h as usize;
    if pixels > max_pixels {
        return Err(Error::InvalidArgument(format!(
            "the image is {w}x{h} = {pixels} pixels, more than the {max_pixels} allowed"
        )));
    }
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::InvalidArgument(format!("cannot read the image: {e}")))?;
    // The header check above is the guard; the decoder's own limits stay as a backstop.
    reader.limits(image::Limits::default());
    reader
        .decode()
        .map_err(|e| Error::InvalidArgument(format!("cannot decode the image: {e}")))
}

/// 8-bit pixels of kind `P`, `from` (width, height) scaled to `to` with a Lanczos filter.
fn resize<P: image::Pixel<Subpixel = u8> + 'static>(
    pixels: &[u8],
    from: (usize, usize),
    to: (usize, usize),
) -> Result<Vec<u8>> {
    if from == to {
        return Ok(pixels.to_vec());
    }
    let source = image::ImageBuffer::<P, &[u8]>::from_raw(from.0 as u32, from.1 as u32, pixels)
        .ok_or_else(|| Error::Other("an image's pixels do not match its size".into()))?;
    let filter = image::imageops::FilterType::Lanczos3;
    Ok(image::imageops::resize(&source, to.0 as u32, to.1 as u32, filter).into_raw())
}

impl RgbImage {
    /// Decodes a PNG or JPEG of at most `max_pixels`; an alpha channel is dropped (diffusers
    /// reads init images as RGB).
    pub fn decode(bytes: &[u8], max_pixels: usize) -> Result<Self> {
        let rgb = decode(bytes, max_pixels)?.into_rgb8();
        Ok(RgbImage {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            pixels: rgb.into_raw(),
        })
    }

    /// The image scaled to `width` x `height` with a Lanczos filter (as AUTOMATIC1111 and
    /// PIL resize init images; the filters' details differ, so pixels may differ slightly).
    pub fn resized(&self, width: usize, height: usize) -> Result<Self> {
        Ok(RgbImage {
            width,
            height,
            pixels: resize::<image::Rgb<u8>>(
                &self.pixels,
                (self.width, self.height),
                (width, height),
            )?,
        })
    }

    /// Encodes the image as PNG.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let encoder = image::codecs::png::PngEncoder::new(&mut out);
        image::ImageEncoder::write_image(
            encoder,
            &self.pixels,
            self.width as u32,
            self.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Other(format!("PNG encoding failed: {e}")))?;
        Ok(out)
    }

    /// diffusers' `VaeImageProcessor.preprocess`: `[1, 3, H, W]` in [-1, 1], computed as
    /// numpy's float32 `x / 255` then torch's `2 * x - 1`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let plane = self.width * self.height;
        let mut data = vec![0f32; 3 * plane];
        for (i, rgb) in self.pixels.chunks_exact(3).enumerate() {
            for (c, &v) in rgb.iter().enumerate() {
                data[c * plane + i] = 2.0 * (v as f32 / 255.0) - 1.0;
            }
        }
        Tensor::from_vec(data, &[1, 3, self.height, self.width], device)
    }
}

impl MaskImage {
    /// Decodes a PNG or JPEG mask of at most `max_pixels` to luminance as PIL's
    /// `convert("L")` does (diffusers' mask processor): grey images as they are, colour
    /// ones by ITU-R 601 weights in PIL's fixed point, alpha ignored.
    pub fn decode(bytes: &[u8], max_pixels: usize) -> Result<Self> {
        let image = decode(bytes, max_pixels)?;
        let (width, height) = (image.width() as usize, image.height() as usize);
        let luma = if image.color().has_color() {
            image
                .into_rgb8()
                .pixels()
                .map(|p| {
                    let [r, g, b] = p.0.map(u32::from);
                    // PIL's L24: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16.
                    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
                })
                .collect()
        } else {
            image.into_luma8().into_raw()
        };
        Ok(MaskImage {
            width,
            height,
            luma,
        })
    }

    /// The mask scaled to `width` x `height` (Lanczos, as [`RgbImage::resized`]).
    pub fn resized(&self, width: usize, height: usize) -> Result<Self> {
        Ok(MaskImage {
            width,
            height,
            luma: resize::<image::Luma<u8>>(
                &self.luma,
                (self.width, self.height),
                (width, height),
            )?,
        })
    }

    /// White for black and black for white (A1111's `inpainting_mask_invert`).
    pub fn inverted(mut self) -> Self {
        for v in &mut self.luma {
            *v = 255 - *v;
        }
        self
    }

    /// Whether each pixel is repainted: diffusers binarises `L / 255` at 0.5, so 128 and up.
    fn repaints(&self) -> impl Iterator<Item = bool> + '_ {
        self.luma.iter().map(|&v| v >= 128)
    }

    /// The binarised mask `[1, 1, H, W]` (1 repaints) and the init image with the repainted
    /// region zeroed (`image * (mask < 0.5)`), as diffusers' inpainting pipeline makes them.
    pub fn apply(&self, image: &RgbImage, device: &Device) -> Result<(Tensor, Tensor)> {
        if (image.width, image.height) != (self.width, self.height) {
            return Err(Error::InvalidArgument(format!(
                "the mask is {}x{} but the init image is {}x{}: they must be the same size",
                self.width, self.height, image.width, image.height
            )));
        }
        let mask: Vec<f32> = self.repaints().map(|r| f32::from(u8::from(r))).collect();
        let plane = mask.len();
        let mut masked = image.to_tensor(&Device::Cpu)?.to_vec()?;
        for c in 0..3 {
            for (v, &m) in masked[c * plane..(c + 1) * plane].iter_mut().zip(&mask) {
                *v *= 1.0 - m;
            }
        }
        let shape = [1, 1, self.height, self.width];
        Ok((
            Tensor::from_vec(mask, &shape, device)?,
            Tensor::from_vec(masked, &[1, 3, self.height, self.width], device)?,
        ))
    }

    /// The binarised mask at latent resolution `[1, 1, H/f, W/f]`: torch's nearest
    /// interpolation to `1/f` of the size picks pixel `(f·i, f·j)`.
    pub fn latent_mask(&self, factor: usize, device: &Device) -> Result<Tensor> {
        let (h, w) = (self.height / factor, self.width / factor);
        let repaints: Vec<bool> = self.repaints().collect();
        let data = (0..h)
            .flat_map(|i| (0..w).map(move |j| (i, j)))
            .map(|(i, j)| f32::from(u8::from(repaints[i * factor * self.width + j * factor])))
            .collect();
        Tensor::from_vec(data, &[1, 1, h, w], device)
    }
}

/// diffusers' post-processing of one decoded image `[1, 3, H, W]`:
/// `(x / 2 + 0.5).clamp(0, 1)`, then numpy's `(x * 255).round()` (ties to even).
pub fn to_rgb8(decoded: &Tensor) -> Result<RgbImage> {
    decoded.expect_rank("to_rgb8", 4)?;
    let (c, h, w) = (decoded.dim(1), decoded.dim(2), decoded.dim(3));
    if decoded.dim(0) != 1 || c != 3 {
        return Err(Error::shape(
            "to_rgb8",
            format!("expected [1, 3, H, W], got {:?}", decoded.shape()),
        ));
    }
    // Clamped here, not on the device, so that NaN is seen before it becomes a black pixel
    // (clamping is exact, so the pixels are the same).
    let values = decoded.affine(0.5, 0.5)?.to_vec()?;
    ensure_finite(&values, "the decoded image's pixels")?;
    let mut pixels = vec![0u8; h * w * 3];
    for ch in 0..3 {
        for (i, v) in values[ch * h * w..(ch + 1) * h * w].iter().enumerate() {
            pixels[i * 3 + ch] = (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
        }
    }
    Ok(RgbImage {
        width: w,
        height: h,
        pixels,
    })
}

pub(crate) fn ensure_finite(values: &[f32], what: &'static str) -> Result<()> {
    if values.iter().all(|v| v.is_finite()) {
        Ok(())
    } else {
        Err(Error::NonFinite { what })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(image: image::DynamicImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn colour_masks_use_pil_luminance_and_binarise_at_128() {
        let rgb = image::RgbImage::from_fn(4, 1, |x, _| match x {
            0 => image::Rgb([255, 0, 0]),     // L 76: keeps
            1 => image::Rgb([0, 255, 0]),     // L 150: repaints
            2 => image::Rgb([128, 128, 128]), // L 128: repaints
            _ => image::Rgb([127, 127, 127]), // L 127: keeps
        });
        let mask = MaskImage::decode(&png(rgb.into()), 100).unwrap();
        assert_eq!(mask.luma, [76, 150, 128, 127]);
        assert_eq!(
            mask.repaints().collect::<Vec<_>>(),
            [false, true, true, false]
        );
    }

    #[test]
    fn images_over_the_pixel_budget_are_refused_from_the_header() {
        let big = png(image::RgbImage::new(20, 10).into());
        let e = RgbImage::decode(&big, 199).unwrap_err().to_string();
        assert!(e.contains("20x10 = 200 pixels"), "{e}");
        assert!(RgbImage::decode(&big, 200).is_ok());
        let e = RgbImage::decode(b"GIF89a....", 100)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Gif") || e.contains("PNG or JPEG"), "{e}");
    }

    #[test]
    fn the_latent_mask_samples_every_factor_th_pixel() {
        let luma: Vec<u8> = (0..8 * 4)
            .map(|i| if i % 8 == 4 { 255 } else { 0 })
            .collect();
        let mask = MaskImage {
            width: 8,
            height: 4,
            luma,
        };
        let latent = mask.latent_mask(4, &Device::Cpu).unwrap();
        assert_eq!(latent.shape(), [1, 1, 1, 2]);
        assert_eq!(latent.to_vec().unwrap(), [0.0, 1.0]);
    }
}
