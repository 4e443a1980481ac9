//! How an error and its causes are shown: one line, each cause once. Formatting only; it must
//! not decide which errors are shown or how they end a run.

/// An error and its causes on one line, `outer: cause: …`: the one way devsync shows an
/// error chain. A cause whose text the message just before it ends with is not repeated (many
/// messages end with their cause, and their type still hands it on as a `source`). Only that
/// ending counts: text that merely appears earlier (a file name, a remote's message) never
/// hides a cause.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut prev = String::new();
    for cause in std::iter::successors(Some(e), |e| e.source()) {
        let text = cause.to_string();
        if !text.is_empty() && !prev.ends_with(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        prev = text;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::chain;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("a.txt: creating temp file: {0}")]
        Names(#[source] std::io::Error),
        #[error("writing")]
        Plain(#[source] std::io::Error),
        /// Names a cause's text, but not as its ending.
        #[error("remote said: Connection timed out (os error 110); we tried again")]
        Mentions(#[source] std::io::Error),
    }

    #[test]
    fn a_chain_names_each_cause_once() {
        let io = || std::io::Error::from_raw_os_error(13);
        assert_eq!(
            chain(&Outer::Names(io())),
            "a.txt: creating temp file: Permission denied (os error 13)"
        );
        assert_eq!(
            chain(&Outer::Plain(io())),
            "writing: Permission denied (os error 13)"
        );
        let timed_out = std::io::Error::from_raw_os_error(110);
        assert_eq!(
            chain(&Outer::Mentions(timed_out)),
            "remote said: Connection timed out (os error 110); we tried again: Connection timed out (os error 110)"
        );
        let any = anyhow::Error::from(Outer::Names(io())).context("pushing");
        assert_eq!(
            chain(any.as_ref()),
            "pushing: a.txt: creating temp file: Permission denied (os error 13)"
        );
    }
}
