//! The `control` target: arbitrary bytes as one control-socket request line.
//!
//! Properties:
//! - a request that parses is sent by `to_json` as a line that parses back
//!   to the same request;
//! - a refused line gets a non-empty message (what the client is shown).

use fencelab_device::control::Request;

pub fn check(data: &[u8]) {
    match Request::parse(data) {
        Ok(request) => {
            let line = request.to_json().to_string();
            let again = Request::parse(line.as_bytes())
                .unwrap_or_else(|e| panic!("{request:?} is sent as {line}, refused: {e}"));
            assert_eq!(again, request, "{line}");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    #[test]
    fn every_documented_request_parses_and_round_trips() {
        let lines = seeds::control_requests().expect("device/CONTROL.md readable");
        assert!(lines.len() >= 13, "{lines:?}");
        for line in lines {
            assert!(Request::parse(line.as_bytes()).is_ok(), "{line}");
            check(line.as_bytes());
        }
    }

    #[test]
    fn refused_lines_pass() {
        for line in [
            "",
            "{",
            "[]",
            "{\"cmd\":\"explode\"}",
            "{\"cmd\":1}",
            "\u{0}",
        ] {
            assert!(Request::parse(line.as_bytes()).is_err(), "{line}");
            check(line.as_bytes());
        }
    }
}
