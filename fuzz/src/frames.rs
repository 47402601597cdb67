//! The `gpu` target's input: requests one after another, each preceded by
//! its length as a little-endian `u16`. A length running past the end takes
//! what is left, so every input is a valid sequence.

/// Splits `data` into requests.
pub fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let take = len.min(body.len());
        out.push(&body[..take]);
        rest = &body[take..];
    }
    out
}

/// Joins requests into one input (the inverse of [`split`] for requests
/// shorter than 64 KiB).
pub fn join<'a>(requests: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for r in requests {
        let len = u16::try_from(r.len()).expect("a request of the gpu target is under 64 KiB");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(r);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_then_split_gives_the_requests_back() {
        let a: &[u8] = b"first";
        let b: &[u8] = b"";
        let c: &[u8] = &[7u8; 300];
        let joined = join([a, b, c]);
        assert_eq!(split(&joined), vec![a, b, c]);
    }

    #[test]
    fn a_length_past_the_end_takes_the_rest() {
        assert_eq!(split(&[10, 0, 1, 2, 3]), vec![&[1u8, 2, 3][..]]);
        assert_eq!(split(&[5]), Vec::<&[u8]>::new());
        assert_eq!(split(&[]), Vec::<&[u8]>::new());
    }
}
