//! The per-stage table and timing helpers.

pub(crate) struct Stage {
    pub(crate) name: String,
    pub(crate) ms: f64,
    pub(crate) flops: f64,
    pub(crate) bytes: f64,
    pub(crate) floor_ms: Option<f64>,
    pub(crate) err: String,
}

pub(crate) fn print_table(title: &str, stages: &[Stage]) {
    println!("\n{title}");
    println!(
        "{:<34} {:>10} {:>12} {:>10} {:>10}  error vs f64 reference",
        "stage", "time ms", "GFLOP/s", "GB/s", "floor ms"
    );
    for s in stages {
        let floor = s.floor_ms.map_or("-".into(), |f| format!("{f:.3}"));
        println!(
            "{:<34} {:>10.3} {:>12.1} {:>10.1} {:>10}  {}",
            s.name,
            s.ms,
            s.flops / s.ms / 1e6,
            s.bytes / s.ms / 1e6,
            floor,
            s.err
        );
    }
}

pub(crate) fn rel_err(out: &[f32], r: &[f64]) -> f64 {
    let (mut n, mut d) = (0.0f64, 0.0f64);
    for (&o, &w) in out.iter().zip(r) {
        if !o.is_finite() {
            return f64::INFINITY;
        }
        n += (o as f64 - w).powi(2);
        d += w * w;
    }
    (n / d.max(1e-300)).sqrt()
}

pub(crate) fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}
