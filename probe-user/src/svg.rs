//! The little both hand-drawn charts (histogram, timeline) share: the document head and text
//! escaping.

use std::fmt::Write as _;

pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `<svg>` with a white background and a centred title; close it with `</svg>`.
pub fn start(width: f64, height: f64, title: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
        width / 2.0,
        escape(title)
    );
    svg
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup_once() {
        assert_eq!(
            super::escape(r#"a<b & "c">"#),
            "a&lt;b &amp; &quot;c&quot;&gt;"
        );
        let svg = super::start(100.0, 50.0, "x<y");
        assert!(svg.starts_with("<svg") && svg.contains("x&lt;y"));
    }
}
