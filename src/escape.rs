//! Escaping untrusted bytes (file names, remote messages, remote stderr) before they reach a
//! terminal. Pure functions; it must not decide what is shown, only how.

/// A file name as it may be shown on a terminal: bytes a terminal would act on (C0 controls,
/// DEL, the C1 range) and bytes that are not UTF-8 are written `\#ooo` (octal, as rsync
/// does), and a backslash before `#` is escaped too, so no name can move the cursor, change
/// colours or forge a line. `--json` output is never escaped.
pub fn escape_name(bytes: &[u8]) -> String {
    escape(bytes, false)
}

/// Free text from wherever (remote messages, remote stderr): escaped like names, except that
/// tabs stay and newlines are kept but indented, so a line of it cannot pass for one of ours.
pub fn escape_text(s: &str) -> String {
    escape(s.as_bytes(), true)
}

fn escape(bytes: &[u8], text: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    let octal = |out: &mut String, b: u8| out.push_str(&format!("\\#{b:03o}"));
    for chunk in bytes.utf8_chunks() {
        let mut chars = chunk.valid().chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\n' if text => out.push_str("\n    "),
                '\t' if text => out.push('\t'),
                '\\' if chars.peek() == Some(&'#') => out.push_str("\\#134"),
                c if c.is_control() => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        octal(&mut out, b);
                    }
                }
                c => out.push(c),
            }
        }
        for &b in chunk.invalid() {
            octal(&mut out, b);
        }
    }
    out
}

/// Remote stderr shown as it arrives (traces): escaped line by line, lines kept as they are.
pub fn escape_lines(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&escape(line, true));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape_lines;

    #[test]
    fn remote_stderr_keeps_its_lines_but_not_its_escapes() {
        assert_eq!(
            escape_lines(b"devsync trace: one\n\x1b]0;owned\x07two\n"),
            "devsync trace: one\n\\#033]0;owned\\#007two\n"
        );
    }
}
