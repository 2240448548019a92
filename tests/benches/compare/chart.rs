//! The chart: throughput against concurrency, one line per variant, first executions and replays
//! side by side, with a legend of its own.

use crate::variants::{Framework, Kind, StoreKind, Variant};
use plotters::element::{DashedPathElement, PathElement};
use plotters::prelude::*;
use std::path::Path;

/// One variant's line in each panel: `(clients, requests per second)`.
pub struct Line {
    pub variant: Variant,
    pub label: String,
    pub first: Vec<(usize, f64)>,
    pub replay: Vec<(usize, f64)>,
}

fn color(v: Variant) -> RGBColor {
    match (v.kind, v.store) {
        (Kind::Bare, _) => RGBColor(40, 40, 40),
        (Kind::Peer, _) => RGBColor(148, 52, 196),
        (_, StoreKind::Memory) => RGBColor(31, 119, 180),
        (_, StoreKind::Sqlite) => RGBColor(230, 126, 20),
        (_, StoreKind::Postgres) => RGBColor(44, 160, 44),
        (_, StoreKind::PostgresUnbatched) => RGBColor(23, 190, 207),
        (_, StoreKind::MySql) => RGBColor(140, 86, 75),
        (_, StoreKind::Redis) => RGBColor(214, 39, 40),
        _ => RGBColor(120, 120, 120),
    }
}

/// Hand-written ceilings are thin, ours thick; actix-web dashed, axum solid.
fn style(v: Variant) -> ShapeStyle {
    let width = match v.kind {
        Kind::Hand => 1,
        _ => 2,
    };
    color(v).stroke_width(width)
}

fn dashed(v: Variant) -> bool {
    v.framework == Framework::Actix
}

/// A marker per kind: circle (ours), triangle (hand-written), square (peer), cross (bare).
fn marker<DB: DrawingBackend>(v: Variant, at: (i32, i32)) -> DynElement<'static, DB, (i32, i32)> {
    let c = color(v);
    match v.kind {
        Kind::Ours => Circle::new(at, 4, c.filled()).into_dyn(),
        Kind::Hand => TriangleMarker::new(at, 5, c.filled()).into_dyn(),
        Kind::Peer => Rectangle::new([(at.0 - 4, at.1 - 4), (at.0 + 4, at.1 + 4)], c.filled()).into_dyn(),
        Kind::Bare => Cross::new(at, 5, c.stroke_width(2)).into_dyn(),
    }
}

/// `1k`, `2.5k`, `12k`, `850`.
fn short(v: f64) -> String {
    if v >= 1000.0 {
        let k = v / 1000.0;
        if k >= 10.0 || (k - k.round()).abs() < 0.05 {
            format!("{k:.0}k")
        } else {
            format!("{k:.1}k")
        }
    } else {
        format!("{v:.0}")
    }
}

type Failure = Box<dyn std::error::Error>;

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    lines: &[(Variant, &[(usize, f64)])],
) -> Result<(), Failure> {
    let values = lines.iter().flat_map(|(_, points)| points.iter().map(|p| p.1)).filter(|v| *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi > 0.0 { (lo / 1.5, hi * 1.5) } else { (1.0, 10.0) };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(12)
        .x_label_area_size(54)
        .y_label_area_size(72)
        .build_cartesian_2d(-0.25f64..6.25f64, (lo..hi).log_scale())?;
    let x_label = |x: &f64| {
        let n = 2f64.powf(*x).round();
        if (x - x.round()).abs() < 1e-6 {
            format!("{n:.0}")
        } else {
            String::new()
        }
    };
    let y_label = |y: &f64| short(*y);
    chart
        .configure_mesh()
        .x_labels(7)
        .y_labels(12)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .x_desc("concurrent clients (log scale)")
        .y_desc("requests/s (log scale)")
        .label_style(("sans-serif", 17))
        .axis_desc_style(("sans-serif", 18))
        .max_light_lines(3)
        .light_line_style(RGBColor(238, 238, 238))
        .draw()?;
    for (v, points) in lines {
        let xy: Vec<(f64, f64)> =
            points.iter().filter(|p| p.1 > 0.0).map(|&(c, rps)| ((c as f64).log2(), rps)).collect();
        if dashed(*v) {
            chart.draw_series(DashedLineSeries::new(xy.clone(), 8, 5, style(*v)))?;
        } else {
            chart.draw_series(LineSeries::new(xy.clone(), style(*v)))?;
        }
        let v = *v;
        chart.draw_series(xy.into_iter().map(move |p| EmptyElement::at(p) + marker(v, (0, 0))))?;
    }
    Ok(())
}

/// Writes the chart of `lines` to `path`.
pub fn write(path: &Path, subtitle: &str, lines: &[Line]) -> Result<(), Failure> {
    const WIDTH: u32 = 1500;
    const HEIGHT: u32 = 720;
    const LEGEND: u32 = 300;
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(64);
    top.draw(&Text::new(
        "Throughput against concurrency: idempotent (ours), bare handlers, hand-written ceilings, axum-idempotent",
        (16, 10),
        ("sans-serif", 27).into_font(),
    ))?;
    top.draw(&Text::new(subtitle.to_owned(), (16, 40), ("sans-serif", 17).into_font().color(&RGBColor(90, 90, 90))))?;
    let (plots, legend) = body.split_horizontally(WIDTH - LEGEND);
    let halves = plots.split_evenly((1, 2));
    let first: Vec<_> = lines.iter().map(|l| (l.variant, l.first.as_slice())).collect();
    let replay: Vec<_> = lines.iter().map(|l| (l.variant, l.replay.as_slice())).collect();
    panel(&halves[0], "First execution (a fresh key per request)", &first)?;
    panel(&halves[1], "Replay (keys already completed)", &replay)?;

    legend.draw(&Text::new("variant", (12, 28), ("sans-serif", 20).into_font()))?;
    for (i, line) in lines.iter().enumerate() {
        let y = 60 + 28 * i as i32;
        let v = line.variant;
        let (x0, x1) = (12, 60);
        if dashed(v) {
            legend.draw(&DashedPathElement::new(vec![(x0, y), (x1, y)], 8, 5, style(v)))?;
        } else {
            legend.draw(&PathElement::new(vec![(x0, y), (x1, y)], style(v)))?;
        }
        legend.draw(&(EmptyElement::at((36, y)) + marker(v, (0, 0))))?;
        legend.draw(&Text::new(line.label.clone(), (70, y - 9), ("sans-serif", 19).into_font()))?;
    }
    let notes = [
        "solid: axum; dashed: actix-web",
        "thin, triangles: hand-written ceilings",
        "circles: ours; crosses: bare; squares: peer",
    ];
    for (i, note) in notes.iter().enumerate() {
        let y = 60 + 28 * lines.len() as i32 + 8 + 22 * i as i32;
        legend.draw(&Text::new(*note, (12, y), ("sans-serif", 16).into_font().color(&RGBColor(90, 90, 90))))?;
    }
    root.present()?;
    Ok(())
}
