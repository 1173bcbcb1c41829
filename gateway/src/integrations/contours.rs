//! Masks as polygons, for the tools that draw regions as polygons (Label Studio's
//! `polygonlabels`, X-AnyLabeling's shapes, CVAT's polygon results).
//!
//! Each 8-connected component's outer boundary is followed along the pixel edges (vertices at
//! pixel corners, so a filled polygon covers exactly the component's pixels, holes aside), then
//! simplified with Douglas-Peucker. Holes are not returned, as OpenCV's `RETR_EXTERNAL`, which
//! the reference SAM servers of these tools use.

use osprey_common::mask::Mask;

/// Largest distance, in pixels, between a simplified outline and the pixel boundary.
pub const DEFAULT_TOLERANCE: f64 = 1.0;

/// Outer outlines of the mask's components, largest first, each as `[x, y]` vertices in pixel
/// coordinates (not repeating the first vertex). Components whose outline simplifies to fewer
/// than 3 vertices are dropped.
pub fn outlines(mask: &Mask, tolerance: f64) -> Vec<Vec<[f64; 2]>> {
    let (width, height) = (mask.width() as usize, mask.height() as usize);
    let labels = label_components(mask.data(), width, height);
    let mut seen = std::collections::HashSet::new();
    let mut found: Vec<(usize, Vec<[f64; 2]>)> = Vec::new();
    let mut sizes = std::collections::HashMap::<u32, usize>::new();
    for &label in &labels {
        if label != 0 {
            *sizes.entry(label).or_default() += 1;
        }
    }
    for (index, &label) in labels.iter().enumerate() {
        // The first pixel of a component in raster order has its top-left corner on the outer
        // boundary, with the boundary going east from there.
        if label == 0 || !seen.insert(label) {
            continue;
        }
        let start = ((index % width) as i64, (index / width) as i64);
        let outline = trace(&labels, width, height, label, start);
        let simplified = simplify(&outline, tolerance);
        if simplified.len() >= 3 {
            found.push((sizes[&label], simplified));
        }
    }
    found.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    found.into_iter().map(|(_, outline)| outline).collect()
}

/// 8-connected component labels (0 outside), by flood fill.
fn label_components(data: &[u8], width: usize, height: usize) -> Vec<u32> {
    let mut labels = vec![0u32; data.len()];
    let mut next = 0u32;
    let mut stack = Vec::new();
    for start in 0..data.len() {
        if data[start] == 0 || labels[start] != 0 {
            continue;
        }
        next += 1;
        labels[start] = next;
        stack.push(start);
        while let Some(index) = stack.pop() {
            let (x, y) = ((index % width) as i64, (index / width) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= width as i64 || ny >= height as i64 {
                        continue;
                    }
                    let neighbour = ny as usize * width + nx as usize;
                    if data[neighbour] != 0 && labels[neighbour] == 0 {
                        labels[neighbour] = next;
                        stack.push(neighbour);
                    }
                }
            }
        }
    }
    labels
}

/// Follows the outer boundary of component `label` along pixel edges, clockwise on screen (the
/// component on the right), from the top-left corner of its first pixel; returns the corners
/// where the direction changes.
fn trace(labels: &[u32], width: usize, height: usize, label: u32, start: (i64, i64)) -> Vec<[f64; 2]> {
    let inside = |x: i64, y: i64| {
        x >= 0
            && y >= 0
            && x < width as i64
            && y < height as i64
            && labels[y as usize * width + x as usize] == label
    };
    // Directions east, south, west, north (y grows downwards); turning right is +1.
    const STEPS: [(i64, i64); 4] = [(1, 0), (0, 1), (-1, 0), (0, -1)];
    // The pixels ahead of a vertex, left and right of the direction of travel.
    let ahead = |(x, y): (i64, i64), direction: usize| match direction {
        0 => ((x, y - 1), (x, y)),
        1 => ((x, y), (x - 1, y)),
        2 => ((x - 1, y), (x - 1, y - 1)),
        _ => ((x - 1, y - 1), (x, y - 1)),
    };
    let mut corners = Vec::new();
    let (mut vertex, mut direction) = (start, 0usize);
    loop {
        let ((lx, ly), (rx, ry)) = ahead(vertex, direction);
        let turned = if inside(lx, ly) {
            (direction + 3) % 4
        } else if inside(rx, ry) {
            direction
        } else {
            (direction + 1) % 4
        };
        if turned != direction || corners.is_empty() {
            corners.push([vertex.0 as f64, vertex.1 as f64]);
        }
        direction = turned;
        vertex = (vertex.0 + STEPS[direction].0, vertex.1 + STEPS[direction].1);
        if vertex == start && direction == 3 {
            // Back at the start, arriving from below: the next step would go east again.
            break;
        }
    }
    corners
}

/// Douglas-Peucker on a closed outline.
fn simplify(outline: &[[f64; 2]], tolerance: f64) -> Vec<[f64; 2]> {
    if outline.len() <= 3 || tolerance <= 0.0 {
        return outline.to_vec();
    }
    // Split the ring at the vertex farthest from the first, and simplify both halves.
    let first = outline[0];
    let far = (1..outline.len())
        .max_by(|&a, &b| distance2(outline[a], first).total_cmp(&distance2(outline[b], first)))
        .unwrap_or(1);
    let mut keep = vec![false; outline.len()];
    keep[0] = true;
    keep[far] = true;
    let ring: Vec<[f64; 2]> = outline.iter().copied().chain(std::iter::once(first)).collect();
    mark(&ring, 0, far, tolerance, &mut keep);
    mark(&ring, far, ring.len() - 1, tolerance, &mut keep);
    outline.iter().zip(&keep).filter(|(_, k)| **k).map(|(p, _)| *p).collect()
}

fn mark(points: &[[f64; 2]], from: usize, to: usize, tolerance: f64, keep: &mut [bool]) {
    if to <= from + 1 {
        return;
    }
    let (mut worst, mut worst_distance) = (from, 0.0);
    for index in from + 1..to {
        let distance = segment_distance(points[index], points[from], points[to]);
        if distance > worst_distance {
            (worst, worst_distance) = (index, distance);
        }
    }
    if worst_distance > tolerance {
        if worst < keep.len() {
            keep[worst] = true;
        }
        mark(points, from, worst, tolerance, keep);
        mark(points, worst, to, tolerance, keep);
    }
}

fn distance2(a: [f64; 2], b: [f64; 2]) -> f64 {
    (a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2)
}

fn segment_distance(p: [f64; 2], a: [f64; 2], b: [f64; 2]) -> f64 {
    let length2 = distance2(a, b);
    if length2 == 0.0 {
        return distance2(p, a).sqrt();
    }
    let t = (((p[0] - a[0]) * (b[0] - a[0]) + (p[1] - a[1]) * (b[1] - a[1])) / length2).clamp(0.0, 1.0);
    distance2(p, [a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])]).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(height: u32, width: u32, inside: impl Fn(u32, u32) -> bool) -> Mask {
        let values: Vec<u8> = (0..height)
            .flat_map(|y| (0..width).map(move |x| (x, y)))
            .map(|(x, y)| inside(x, y) as u8)
            .collect();
        Mask::from_row_major(height, width, &values).unwrap()
    }

    #[test]
    fn a_rectangle_is_its_four_corners() {
        // Columns 3..9, rows 2..5 of a 12x7 image.
        let m = mask(7, 12, |x, y| (3..9).contains(&x) && (2..5).contains(&y));
        let outlines = outlines(&m, 0.0);
        assert_eq!(outlines, vec![vec![[3.0, 2.0], [9.0, 2.0], [9.0, 5.0], [3.0, 5.0]]]);
    }

    #[test]
    fn the_outline_rasterises_back_to_the_mask() {
        // An L shape, a lone pixel and a diagonal pair; tolerance 0 keeps every corner.
        let m = mask(10, 13, |x, y| {
            (x < 4 && y < 8)
                || (x < 10 && (5..8).contains(&y))
                || (x, y) == (11, 1)
                || (x, y) == (7, 1)
                || (x, y) == (8, 2)
        });
        let outlines = outlines(&m, 0.0);
        assert_eq!(outlines.len(), 3);
        let polygons: Vec<Vec<f64>> =
            outlines.iter().map(|o| o.iter().flat_map(|p| [p[0], p[1]]).collect()).collect();
        // Every pixel centre inside some outline is a mask pixel and the other way round.
        for y in 0..10 {
            for x in 0..13 {
                let centre = [x as f64 + 0.5, y as f64 + 0.5];
                let covered = polygons.iter().any(|p| contains(p, centre));
                assert_eq!(covered, m.data()[y * 13 + x] == 1, "pixel ({x}, {y})");
            }
        }
        assert_eq!(outlines[0].len(), 6, "the L shape is six corners: {:?}", outlines[0]);
    }

    #[test]
    fn simplification_keeps_the_shape_within_tolerance() {
        // A disc of radius 20: hundreds of staircase corners, far fewer after simplifying.
        let m = mask(50, 60, |x, y| (x as f64 - 30.0).powi(2) + (y as f64 - 25.0).powi(2) < 400.0);
        let exact = outlines(&m, 0.0);
        let simple = outlines(&m, DEFAULT_TOLERANCE);
        assert!(simple[0].len() * 2 < exact[0].len(), "{} vs {}", simple[0].len(), exact[0].len());
        for p in &simple[0] {
            let r = ((p[0] - 30.5).powi(2) + (p[1] - 25.5).powi(2)).sqrt();
            assert!((17.0..23.0).contains(&r), "{p:?} is {r} from the centre");
        }
    }

    #[test]
    fn holes_are_filled_and_empty_masks_give_nothing() {
        let ring = mask(9, 9, |x, y| {
            (1..8).contains(&x) && (1..8).contains(&y) && !((3..6).contains(&x) && (3..6).contains(&y))
        });
        assert_eq!(outlines(&ring, 0.0), vec![vec![[1.0, 1.0], [8.0, 1.0], [8.0, 8.0], [1.0, 8.0]]]);
        assert!(outlines(&Mask::empty(4, 4), 1.0).is_empty());
    }

    /// Even-odd point-in-polygon.
    fn contains(polygon: &[f64], p: [f64; 2]) -> bool {
        let n = polygon.len() / 2;
        let mut inside = false;
        for i in 0..n {
            let (ax, ay) = (polygon[2 * i], polygon[2 * i + 1]);
            let (bx, by) = (polygon[2 * ((i + 1) % n)], polygon[2 * ((i + 1) % n) + 1]);
            if (ay > p[1]) != (by > p[1]) && p[0] < ax + (p[1] - ay) * (bx - ax) / (by - ay) {
                inside = !inside;
            }
        }
        inside
    }
}
