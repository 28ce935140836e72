//! A minimal SVG line chart: a few named series, linear x, log-scale y.

use std::fmt::Write as _;

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];

/// Writes a chart of `series` (name, points) to `path`.
pub fn line_chart(
    path: &std::path::Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> std::io::Result<()> {
    let (w, h, ml, mr, mt, mb) = (720.0, 440.0, 80.0, 170.0, 40.0, 50.0);
    let pts = series
        .iter()
        .flat_map(|s| s.1.iter())
        .filter(|p| p.1 > 0.0 && p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y.log10());
        y1 = y1.max(y.log10());
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let (y0, y1) = (
        y0.floor(),
        if y1.ceil() > y0.floor() {
            y1.ceil()
        } else {
            y0.floor() + 1.0
        },
    );
    let px = |x: f64| ml + (x - x0) / (x1 - x0) * (w - ml - mr);
    let py = |ly: f64| mt + (y1 - ly) / (y1 - y0) * (h - mt - mb);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="15">{title}</text>"#,
        (ml + w - mr) / 2.0
    );
    // Axes, ticks and grid.
    let _ = write!(
        s,
        r#"<g stroke="black"><line x1="{ml}" y1="{}" x2="{}" y2="{}"/><line x1="{ml}" y1="{mt}" x2="{ml}" y2="{}"/></g>"#,
        h - mb,
        w - mr,
        h - mb,
        h - mb
    );
    for k in 0..=5 {
        let x = x0 + (x1 - x0) * k as f64 / 5.0;
        let _ = write!(
            s,
            r##"<line x1="{0}" y1="{mt}" x2="{0}" y2="{1}" stroke="#ddd"/><text x="{0}" y="{2}" text-anchor="middle">{3}</text>"##,
            px(x),
            h - mb,
            h - mb + 16.0,
            trim(x)
        );
    }
    let mut e = y0;
    while e <= y1 + 1e-9 {
        for m in [1.0, 2.0, 5.0] {
            let ly = e + f64::log10(m);
            if ly > y1 + 1e-9 {
                break;
            }
            let _ = write!(
                s,
                r##"<line x1="{ml}" y1="{0}" x2="{1}" y2="{0}" stroke="#ddd"/><text x="{2}" y="{3}" text-anchor="end">{4}</text>"##,
                py(ly),
                w - mr,
                ml - 6.0,
                py(ly) + 4.0,
                trim(10f64.powf(ly))
            );
        }
        e += 1.0;
    }
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text><text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{y_label} (log scale)</text>"#,
        (ml + w - mr) / 2.0,
        h - 12.0,
        (mt + h - mb) / 2.0
    );
    for (i, (name, p)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = p
            .iter()
            .filter(|q| q.1 > 0.0 && q.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y.log10())))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
        let ly = mt + 10.0 + 20.0 * i as f64;
        let _ = write!(
            s,
            r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{2}" y="{3}">{name}</text>"#,
            w - mr + 12.0,
            w - mr + 36.0,
            w - mr + 42.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    std::fs::write(path, s)
}

fn trim(v: f64) -> String {
    let s = if v.abs() >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    };
    s
}
