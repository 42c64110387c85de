//! A small line chart written as SVG by hand: the curves of `coord-bench
//! curves` need axes, a few series and a caption, not a plotting library.

use std::fmt::Write;

/// One line of the chart: its name in the legend and its points.
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(f64, f64)>,
}

/// A chart; `caption` (the command that measured it) is printed under the axes.
pub(crate) struct Chart {
    pub(crate) title: String,
    pub(crate) x_label: String,
    pub(crate) y_label: String,
    /// A logarithmic x axis, for sweeps over powers of ten.
    pub(crate) log_x: bool,
    pub(crate) series: Vec<Series>,
    pub(crate) caption: String,
}

const W: f64 = 720.0;
const H: f64 = 440.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 90.0;
const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Splits `text` at spaces into lines of at most about `width` characters.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let last = lines.last_mut().map(|l| l.len()).unwrap_or(0);
        if last > 0 && last + 1 + word.len() > width {
            lines.push(String::new());
        }
        if let Some(line) = lines.last_mut() {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

/// Five round ticks from 0 to at least `max`.
fn y_ticks(max: f64) -> Vec<f64> {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| s * 5.0 >= max)
        .unwrap_or(10.0 * mag);
    (0..=5).map(|i| i as f64 * step).collect()
}

fn label(v: f64) -> String {
    if v >= 1e6 && v % 1e6 == 0.0 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 && v % 1e3 == 0.0 {
        format!("{}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

impl Chart {
    pub(crate) fn render(&self) -> String {
        let xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .collect();
        let fx = |x: f64| if self.log_x { x.max(1e-9).log10() } else { x };
        let x_min = xs.iter().copied().map(fx).fold(f64::INFINITY, f64::min);
        let x_max = xs.iter().copied().map(fx).fold(f64::NEG_INFINITY, f64::max);
        let (x_min, x_max) = match (x_min.is_finite(), x_max > x_min) {
            (true, true) => (x_min, x_max),
            (true, false) => (x_min - 1.0, x_min + 1.0),
            _ => (0.0, 1.0),
        };
        let y_max = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max);
        let ticks = y_ticks(y_max);
        let y_top = ticks.last().copied().unwrap_or(1.0);
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let px = |x: f64| LEFT + (fx(x) - x_min) / (x_max - x_min) * pw;
        let py = |y: f64| TOP + ph - y / y_top * ph;

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, "<desc>{}</desc>", escape(&self.caption));
        let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="28" text-anchor="middle" font-size="15">{}</text>"#,
            W / 2.0,
            escape(&self.title)
        );
        for &t in &ticks {
            let y = py(t);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                label(t)
            );
        }
        let mut x_ticks = xs.clone();
        x_ticks.sort_by(f64::total_cmp);
        x_ticks.dedup();
        for &x in &x_ticks {
            let _ = writeln!(
                s,
                r##"<line x1="{0:.1}" y1="{TOP}" x2="{0:.1}" y2="{1:.1}" stroke="#eee"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"##,
                px(x),
                TOP + ph,
                TOP + ph + 18.0,
                label(x)
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            TOP + ph + 38.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            TOP + ph / 2.0,
            escape(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let points: Vec<String> = series
                .points
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                points.join(" ")
            );
            for &(x, y) in &series.points {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"><title>{}: {}</title></circle>"#,
                    px(x),
                    py(y),
                    label(x),
                    label(y.round())
                );
            }
            let ly = TOP + 16.0 + 18.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{0:.1}" y1="{ly:.1}" x2="{1:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"/><text x="{2:.1}" y="{3:.1}">{4}</text>"#,
                LEFT + 12.0,
                LEFT + 32.0,
                LEFT + 38.0,
                ly + 4.0,
                escape(&series.name)
            );
        }
        let lines = wrap(&self.caption, 120);
        for (i, line) in lines.iter().enumerate() {
            let _ = writeln!(
                s,
                r##"<text x="10" y="{:.1}" font-size="10" fill="#555">{}</text>"##,
                H - 8.0 - 13.0 * (lines.len() - 1 - i) as f64,
                escape(line)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}
