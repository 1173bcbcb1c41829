//! Coordinates between the tools and the pipeline. The pipeline works in pixels of the image as
//! decoded, EXIF orientation applied (what browsers and the tools display); Label Studio gives
//! percentages of that size, with rectangles as a top-left corner, a size and a rotation in
//! degrees about that corner; X-AnyLabeling and CVAT give pixels, rectangles as two corners.

use osprey_proto::v1;

/// A percentage of `size` (Label Studio) in pixels.
pub fn percent_to_pixels(percent: f64, size: u32) -> f64 {
    percent / 100.0 * size as f64
}

/// Pixels as a percentage of `size`.
pub fn pixels_to_percent(pixels: f64, size: u32) -> f64 {
    if size == 0 { 0.0 } else { pixels / size as f64 * 100.0 }
}

/// A Label Studio rectangle (percent: top-left `x`, `y`, `width`, `height`; `rotation` in
/// degrees clockwise about the top-left corner) as the pixel box around it.
pub fn label_studio_box(
    x: f64,
    y: f64,
    width: f64,
    height: f64,
    rotation: f64,
    image_width: u32,
    image_height: u32,
) -> v1::Box {
    let (x, y) = (percent_to_pixels(x, image_width), percent_to_pixels(y, image_height));
    let (w, h) = (percent_to_pixels(width, image_width), percent_to_pixels(height, image_height));
    let (sin, cos) = rotation.to_radians().sin_cos();
    // Corners relative to the top-left one, rotated on screen (y down, so clockwise).
    let corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
        .map(|(dx, dy)| (x + dx * cos - dy * sin, y + dx * sin + dy * cos));
    let xs = corners.map(|c| c.0);
    let ys = corners.map(|c| c.1);
    let min = |v: [f64; 4]| v.into_iter().fold(f64::INFINITY, f64::min);
    let max = |v: [f64; 4]| v.into_iter().fold(f64::NEG_INFINITY, f64::max);
    v1::Box { x0: min(xs) as f32, y0: min(ys) as f32, x1: max(xs) as f32, y1: max(ys) as f32 }
}

/// A box from two corners in any order (X-AnyLabeling and CVAT send `[x1, y1, x2, y2]`).
pub fn corner_box(a: [f64; 2], b: [f64; 2]) -> v1::Box {
    v1::Box {
        x0: a[0].min(b[0]) as f32,
        y0: a[1].min(b[1]) as f32,
        x1: a[0].max(b[0]) as f32,
        y1: a[1].max(b[1]) as f32,
    }
}

/// A SAM point in pixels.
pub fn point(x: f64, y: f64, foreground: bool) -> v1::Point {
    let label = if foreground { v1::PointLabel::Foreground } else { v1::PointLabel::Background };
    v1::Point { x: x as f32, y: y as f32, label: label as i32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_is_of_each_axis_own_size() {
        // A 300 x 100 image: 50 % across is 150 px, 50 % down is 50 px.
        assert_eq!(percent_to_pixels(50.0, 300), 150.0);
        assert_eq!(percent_to_pixels(50.0, 100), 50.0);
        assert_eq!(pixels_to_percent(75.0, 300), 25.0);
        assert_eq!(pixels_to_percent(75.0, 100), 75.0);
    }

    #[test]
    fn label_studio_rectangles_are_corner_and_size() {
        let b = label_studio_box(10.0, 20.0, 30.0, 40.0, 0.0, 300, 100);
        assert_eq!((b.x0, b.y0, b.x1, b.y1), (30.0, 20.0, 120.0, 60.0));
    }

    #[test]
    fn rotated_rectangles_give_the_box_around_them() {
        // 90 degrees clockwise about the top-left corner: the box swings to the left of it.
        let b = label_studio_box(50.0, 10.0, 10.0, 20.0, 90.0, 200, 100);
        let close = |a: f32, b: f32| (a - b).abs() < 1e-3;
        assert!(close(b.x0, 80.0) && close(b.y0, 10.0) && close(b.x1, 100.0) && close(b.y1, 30.0), "{b:?}");
    }

    #[test]
    fn corner_boxes_are_ordered() {
        let b = corner_box([120.0, 5.0], [20.0, 50.0]);
        assert_eq!((b.x0, b.y0, b.x1, b.y1), (20.0, 5.0, 120.0, 50.0));
    }
}
