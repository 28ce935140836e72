//! Loss curves as SVG, drawn with plotters.

use std::path::Path;

use plotters::prelude::*;

/// A log-scale line chart of `series` (name, points) against `x_label`.
pub fn chart(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), Box<dyn std::error::Error>> {
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.1.iter())
            .filter(|p| p.1 > 0.0 && p.1.is_finite())
    };
    let x1 = pts().map(|p| p.0).fold(1.0, f64::max);
    let y0 = pts().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y1 = pts().map(|p| p.1).fold(0.0, f64::max);
    let (y0, y1) = if y0 < y1 {
        (y0 * 0.9, y1 * 1.1)
    } else {
        (0.1, 10.0)
    };
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x1, (y0..y1).log_scale())?;
    c.configure_mesh()
        .x_desc(x_label)
        .y_desc("training loss")
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        c.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
