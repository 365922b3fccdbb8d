//! Text from outside, made safe to print (issue 11 item 11).
//!
//! Namespace names come from `/run/netns` and from process names (any
//! process sets its own `comm`); host names and names in a capture come
//! from whoever wrote the file. Printed raw, `ESC[2J` in a name clears the
//! terminal of whoever runs `report`, and control characters make an SVG
//! invalid XML. Human and markdown output pass through [`printable`], SVG
//! text through [`xml`]. `printable` keeps newlines (it is applied to whole
//! multi-line renderings), so every value from outside that is put on a
//! line — a namespace or host name, a path, a recorded message — goes
//! through [`field`] as well: a name with a newline in it would otherwise
//! print a line of its own (a fake `WARNING:` or table row).

use std::borrow::Cow;

/// Characters that must not reach a terminal as they are: C0 controls
/// other than newline and tab, DEL, C1 controls, and the bidirectional
/// overrides/isolates that reorder what a reader sees.
fn unsafe_char(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || ('\u{202a}'..='\u{202e}').contains(&c)
        || ('\u{2066}'..='\u{2069}').contains(&c)
}

/// `s` with every unsafe character written as a visible escape (`\x1b`,
/// `\u{202e}`); newlines and tabs are kept (the text is multi-line).
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unsafe_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            escape(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Line breaks a value must not bring into a line of output: newline and
/// tab (kept by [`printable`]), and the Unicode line and paragraph
/// separators (NEL is a C1 control, already unsafe).
fn breaks_line(c: char) -> bool {
    matches!(c, '\n' | '\t' | '\u{2028}' | '\u{2029}')
}

/// One value on a line of human or markdown output: [`printable`], with
/// newlines, tabs and Unicode line separators escaped too (`\x0a`), so it
/// stays on its line.
pub fn field(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| unsafe_char(c) || breaks_line(c)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) || breaks_line(c) {
            escape(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A visible escape for `c`: `\x1b` below U+0100, `\u{202e}` above.
fn escape(out: &mut String, c: char) {
    if (c as u32) < 0x100 {
        out.push_str(&format!("\\x{:02x}", c as u32));
    } else {
        out.push_str(&format!("\\u{{{:x}}}", c as u32));
    }
}

/// `s` as XML character data or an attribute value: markup characters
/// escaped, and characters XML 1.0 forbids (most C0 controls) — as well
/// as the other unsafe ones — written as visible escapes.
pub fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' | '\t' => out.push(' '),
            '\u{fffe}' | '\u{ffff}' => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c if unsafe_char(c) => out.push_str(&printable(&c.to_string())),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible() {
        assert!(matches!(printable("srv-1\n\tok"), Cow::Borrowed(_)));
        assert_eq!(printable("a\x1b[2Jb\x07\x7f"), "a\\x1b[2Jb\\x07\\x7f");
        assert_eq!(printable("\u{9b}31m"), "\\x9b31m");
        assert_eq!(printable("abc\u{202e}fed"), "abc\\u{202e}fed");
        assert_eq!(printable("\r"), "\\x0d");
    }

    /// Review of issue 11: `printable` keeps newlines (whole renderings are
    /// multi-line), so a namespace name with one printed a line of its own.
    #[test]
    fn a_field_stays_on_its_line() {
        assert!(matches!(field("ctt-srv pid 7 (dnsmasq)"), Cow::Borrowed(_)));
        assert_eq!(
            field("srv\nWARNING: all clear\r\t\u{2028}x\x1b"),
            "srv\\x0aWARNING: all clear\\x0d\\x09\\u{2028}x\\x1b"
        );
        assert_eq!(field(&printable("a\nb")), "a\\x0ab");
        assert!(!field("a\u{2029}b\u{85}").contains(['\u{2029}', '\u{85}']));
    }

    #[test]
    fn xml_is_escaped_and_valid() {
        assert_eq!(
            xml("<a href=\"x\">&'\x1b\x00\n"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&apos;\\x1b\\x00 "
        );
        let x = xml("\u{1}\u{8}\u{b}\u{c}\u{1f}\u{fffe}");
        assert!(
            x.chars().all(|c| !c.is_control() && c != '\u{fffe}'),
            "{x:?}"
        );
    }
}
