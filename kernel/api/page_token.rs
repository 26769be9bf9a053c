//! ListKnowledge's page tokens: opaque to clients and checked on return, so
//! a forged or mangled token is refused instead of silently listing from
//! wherever it happens to point. A token is `p1` followed by the hex of the
//! last listed id and a CRC32C of it; it stays valid across restarts.

use super::convert::MAX_ID_BYTES;
use crate::error::{Error, Result};

const PREFIX: &str = "p1";
/// Keeps the checksum from being that of the bare id.
const DOMAIN: &[u8] = b"aitl.v1.ListKnowledge.page_token\0";

fn checksum(id: &str) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(DOMAIN), id.as_bytes())
}

/// The token that resumes a listing after `last_id`.
pub fn encode(last_id: &str) -> String {
    let mut bytes = last_id.as_bytes().to_vec();
    bytes.extend_from_slice(&checksum(last_id).to_le_bytes());
    let mut token = String::with_capacity(PREFIX.len() + 2 * bytes.len());
    token.push_str(PREFIX);
    for b in bytes {
        token.push_str(&format!("{b:02x}"));
    }
    token
}

/// The id a token resumes after; INVALID_ARGUMENT for anything this server
/// did not issue.
pub fn decode(token: &str) -> Result<String> {
    let refuse = || {
        Error::invalid(
            "page_token",
            "is not a token this server issued; pass a response's next_page_token unchanged, or empty for the first page",
        )
    };
    if token.len() > PREFIX.len() + 2 * (MAX_ID_BYTES + 4) {
        return Err(refuse());
    }
    let hex = token.strip_prefix(PREFIX).ok_or_else(refuse)?;
    if hex.len() % 2 != 0 || hex.len() < 2 * 5 {
        return Err(refuse());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).ok_or_else(refuse)?, 16).map_err(|_| refuse()))
        .collect::<Result<Vec<u8>>>()?;
    let (id, crc) = bytes.split_at(bytes.len() - 4);
    let id = std::str::from_utf8(id).map_err(|_| refuse())?;
    if crc != checksum(id).to_le_bytes() {
        return Err(refuse());
    }
    Ok(id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_forgeries_are_refused() {
        for id in ["a", "faq-17", "hôtel/été 9"] {
            assert_eq!(decode(&encode(id)).unwrap(), id);
        }
        let good = encode("faq-17");
        let mut flipped = good.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        let forged = String::from_utf8(flipped).unwrap();
        // The raw id (what tokens used to be), a changed digit, odd length,
        // another prefix, non-hex: all refused with the field named.
        for bad in ["faq-17", forged.as_str(), &good[..good.len() - 1], &good.replacen("p1", "p2", 1), "p1zz00000000"] {
            let err = decode(bad).unwrap_err().to_string();
            assert!(err.contains("page_token") && err.contains("next_page_token"), "{bad}: {err}");
        }
    }
}
