//! A self-contained SVG picture of per-rank memory, stacked by [`TensorKind`].

use std::fmt::Write;

use crate::sharding::TensorKind;

use super::Plan;

/// Kinds in stacking order (bottom first), with their legend label and fill colour.
const KINDS: [(TensorKind, &str, &str); 6] = [
    (TensorKind::Embedding, "embeddings", "#4e79a7"),
    (TensorKind::Attention, "attention", "#f28e2b"),
    (TensorKind::Mlp, "MLP", "#59a14f"),
    (TensorKind::Experts, "experts", "#e15759"),
    (TensorKind::Norm, "norms", "#b07aa1"),
    (TensorKind::Other, "other", "#9c9c9c"),
];

/// Binary-unit size for axis labels (`1.5 GiB`).
fn size_label(bytes: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v == v.trunc() {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A "nice" tick step (1, 2 or 5 × a power of 1024-scaled unit) giving about 5 ticks.
fn tick_step(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let unit = 1024f64.powi(((max.max(1.0)).log(1024.0)).floor() as i32);
    let scaled = max / unit;
    let raw = scaled / 5.0;
    let mag = 10f64.powi(raw.log10().floor() as i32);
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * mag);
    step * unit
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders per-rank memory as a stacked bar chart: one bar per global rank, stacked by tensor
/// kind, with axis labels, a legend and a title naming the spec and topology. Every bar has a
/// `<title>` tooltip with the rank's coordinates and per-kind bytes.
pub fn memory_svg(plan: &Plan) -> String {
    let n = plan.ranks.len().max(1);
    let bar = (720 / n).clamp(3, 48) as f64;
    let gap = if bar >= 8.0 { bar * 0.2 } else { 0.5 };
    let (left, right, top, bottom) = (90.0, 170.0, 50.0, 60.0);
    let plot_w = n as f64 * bar;
    let plot_h = 360.0;
    let width = left + plot_w + right;
    let height = top + plot_h + bottom;
    let max = plan.ranks.iter().map(|r| r.bytes).max().unwrap_or(0) as f64;
    let step = tick_step(max);
    let top_val = if max > 0.0 {
        (max / step).ceil() * step
    } else {
        1.0
    };
    let y = |v: f64| top + plot_h - v / top_val * plot_h;

    let mut s = String::new();
    let t = &plan.topology;
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="24" font-size="15" text-anchor="middle">Memory per rank: spec {}, tp={} pp={} dp={} ep={}</text>"#,
        left + plot_w / 2.0,
        escape(&plan.spec),
        t.tp,
        t.pp,
        t.dp,
        t.ep
    );
    // Y axis with ticks and grid lines.
    let mut v = 0.0;
    while v <= top_val * 1.0001 {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + plot_w,
            left - 6.0,
            yy + 4.0,
            size_label(v)
        );
        v += step;
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle">bytes held</text>"#,
        top + plot_h / 2.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">global rank (tp fastest; dashed lines separate TP groups)</text>"#,
        left + plot_w / 2.0,
        top + plot_h + 42.0
    );
    // Bars.
    for (i, r) in plan.ranks.iter().enumerate() {
        let x = left + i as f64 * bar + gap / 2.0;
        let w = bar - gap;
        let by_kind = r.bytes_by_kind();
        let mut tip = format!(
            "rank {} (dp {}, pp {}, tp {}): {}",
            r.coords.rank,
            r.coords.dp_rank,
            r.coords.pp_rank,
            r.coords.tp_rank,
            size_label(r.bytes as f64)
        );
        for (kind, label, _) in KINDS {
            if let Some((_, b)) = by_kind.iter().find(|(k, _)| *k == kind) {
                let _ = write!(tip, "; {label} {}", size_label(*b as f64));
            }
        }
        let _ = writeln!(s, "<g><title>{}</title>", escape(&tip));
        let mut acc = 0.0;
        for (kind, _, color) in KINDS {
            let Some((_, b)) = by_kind.iter().find(|(k, _)| *k == kind) else {
                continue;
            };
            let b = *b as f64;
            let (y0, y1) = (y(acc), y(acc + b));
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y1:.1}" width="{w:.1}" height="{:.1}" fill="{color}"/>"#,
                (y0 - y1).max(0.0)
            );
            acc += b;
        }
        let _ = writeln!(s, "</g>");
        // Rank labels when there is room, else every stage's first rank.
        let first_of_stage = r.coords.tp_rank == 0;
        if bar >= 16.0 || (first_of_stage && i % (t.tp.max(1)) == 0 && bar * t.tp as f64 >= 24.0) {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                x + w / 2.0,
                top + plot_h + 14.0,
                r.coords.rank
            );
        }
        if first_of_stage && i > 0 && t.tp > 1 {
            let xs = left + i as f64 * bar;
            let _ = writeln!(
                s,
                r##"<line x1="{xs:.1}" y1="{top}" x2="{xs:.1}" y2="{:.1}" stroke="#888" stroke-dasharray="3,3"/>"##,
                top + plot_h
            );
        }
    }
    // Axes.
    let _ = writeln!(
        s,
        r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="black"/><line x1="{left}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        top + plot_h,
        top + plot_h,
        left + plot_w,
        top + plot_h
    );
    // Legend.
    let lx = left + plot_w + 20.0;
    let _ = writeln!(
        s,
        r#"<text x="{lx:.1}" y="{:.1}" font-weight="bold">tensor kind</text>"#,
        top + 4.0
    );
    for (i, (_, label, color)) in KINDS.iter().rev().enumerate() {
        let ly = top + 16.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{ly:.1}" width="14" height="14" fill="{color}"/><text x="{:.1}" y="{:.1}">{label}</text>"#,
            lx + 20.0,
            ly + 11.0
        );
    }
    s.push_str("</svg>\n");
    s
}
