//! Request context that travels between prism's processes: the request id,
//! the W3C trace context, and the time a caller will wait. The gateway sets
//! them on every upstream call; the orders service passes them on to the
//! users service.

use std::sync::atomic::{AtomicU64, Ordering};

use hyper::header::{HeaderName, HeaderValue};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const X_REQUEST_TIMEOUT_MS: HeaderName = HeaderName::from_static("x-request-timeout-ms");

/// The time an `x-request-timeout-ms` value gives, or `None` when it is not
/// a number of milliseconds.
pub fn time_given(value: &HeaderValue) -> Option<std::time::Duration> {
    let ms = value.to_str().ok()?.parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// Unique ids without a random draw per request: a random per-process
/// prefix and a counter (the W3C format only asks for uniqueness). Fills
/// `out` (16 or 32 bytes) with lowercase hex digits.
fn next_id(out: &mut [u8]) {
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_le_bytes(b)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    match out.len() {
        16 => hex(out, prefix ^ n.rotate_left(32)),
        _ => {
            hex(&mut out[..16], prefix);
            hex(&mut out[16..32], n);
        }
    }
}

/// A new 32-hex-digit id (request and trace ids).
pub fn new_id32() -> [u8; 32] {
    let mut id = [0u8; 32];
    next_id(&mut id);
    id
}

/// `n` as sixteen lowercase hex digits into `out[..16]` (this runs several
/// times per proxied request, so a byte at a time from a table, no `format!`).
pub(crate) fn hex(out: &mut [u8], n: u64) {
    const PAIRS: [[u8; 2]; 256] = {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
            i += 1;
        }
        t
    };
    for (pair, byte) in out[..16].chunks_exact_mut(2).zip(n.to_be_bytes()) {
        pair.copy_from_slice(&PAIRS[byte as usize]);
    }
}

/// The trace id and sampled flag of a W3C `traceparent`
/// (`00-<32 hex trace id>-<16 hex parent>-<2 hex flags>`).
pub fn parse_traceparent(tp: &[u8]) -> Option<([u8; 32], bool)> {
    let mut parts = tp.split(|b| *b == b'-');
    let (_version, trace, _parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !trace.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    Some((trace.try_into().ok()?, flags == b"01"))
}

/// A `traceparent` naming a new span in the trace `trace_id`.
pub fn new_span(trace_id: &[u8; 32], sampled: bool) -> HeaderValue {
    // 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>
    let mut out = *b"00-________________________________-________________-00";
    out[3..35].copy_from_slice(trace_id);
    next_id(&mut out[36..52]);
    if sampled {
        out[54] = b'1';
    }
    HeaderValue::from_bytes(&out).expect("hex digits and dashes are a valid header value")
}

/// The `traceparent` for a call made while serving a request that carried
/// `incoming`: the same trace and sampling, this call's own span. `None`
/// when `incoming` is not a `traceparent`.
pub fn child_traceparent(incoming: &[u8]) -> Option<HeaderValue> {
    let (trace_id, sampled) = parse_traceparent(incoming)?;
    Some(new_span(&trace_id, sampled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digits_are_the_number_in_lowercase() {
        let mut out = [0u8; 16];
        for n in [0, 1, 0xdead_beef, 0x0123_4567_89ab_cdef, u64::MAX] {
            hex(&mut out, n);
            assert_eq!(std::str::from_utf8(&out).unwrap(), format!("{n:016x}"));
        }
    }

    #[test]
    fn ids_are_lowercase_hex_and_unique() {
        let (a, b) = (new_id32(), new_id32());
        assert_ne!(a, b);
        assert_eq!(a[..16], b[..16], "one per-process prefix");
        let (mut s1, mut s2) = ([0u8; 16], [0u8; 16]);
        next_id(&mut s1);
        next_id(&mut s2);
        assert_ne!(s1, s2);
        let lower_hex = |s: &[u8]| {
            s.iter()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        };
        assert!(lower_hex(&a) && lower_hex(&s1));
    }

    #[test]
    fn a_child_traceparent_keeps_the_trace_and_sampling_with_a_new_span() {
        let parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = child_traceparent(parent).unwrap();
        let parts: Vec<&str> = child.to_str().unwrap().split('-').collect();
        assert_eq!(
            (parts[0], parts[1], parts[3]),
            ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
        );
        assert_ne!(parts[2], "00f067aa0ba902b7");
        assert_eq!(child_traceparent(b"not a traceparent"), None);
        assert_eq!(child_traceparent(b"00-zz-00f067aa0ba902b7-01"), None);
    }

    #[test]
    fn a_time_limit_is_whole_milliseconds() {
        let ms = |v: &'static str| time_given(&HeaderValue::from_static(v));
        assert_eq!(ms("250"), Some(std::time::Duration::from_millis(250)));
        assert_eq!(ms("0"), Some(std::time::Duration::ZERO));
        for bad in ["", "-5", "1.5", "soon"] {
            assert_eq!(ms(bad), None, "{bad:?}");
        }
    }
}
