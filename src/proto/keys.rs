//! Pre-shared keys: parsing key-file text, redacted `Debug`, zeroize on drop.
//! Reading the file is the caller's ([`crate::config::load_key_file`]).

use std::fmt;

use base64::Engine;
use zeroize::Zeroize;

/// Bytes in a pre-shared key.
pub const PSK_LEN: usize = 32;

/// Keys a key file may hold (rotation needs two; 16 leaves room).
pub const MAX_KEYS: usize = 16;

/// A 32-byte pre-shared key. Never printed, wiped on drop.
#[derive(Clone)]
pub struct Psk([u8; PSK_LEN]);

impl Drop for Psk {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl Psk {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; PSK_LEN]) -> Self {
        Psk(bytes)
    }

    /// The key bytes, for the key schedule only.
    pub(crate) fn bytes(&self) -> &[u8; PSK_LEN] {
        &self.0
    }

    /// A fresh random key from the OS.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut k = [0u8; PSK_LEN];
        getrandom::fill(&mut k)?;
        Ok(Psk(k))
    }

    /// The key as the key file stores it (standard base64).
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// A short, non-secret fingerprint for logs and `shardproxy_key_info`:
    /// the first 4 bytes of SHA-256 of the 32 key bytes, as 8 lowercase hex
    /// digits. Printed by `keygen`, `check`, at start-up and on SIGHUP.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let d = sha2::Sha256::digest(self.0);
        d[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Psk(<redacted {}>)", self.fingerprint())
    }
}

/// Why a key file was rejected. One line each; never contains key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("cannot read key file {path}: {reason}")]
    Unreadable {
        /// The path.
        path: String,
        /// The OS error text.
        reason: String,
    },
    /// A line is not base64.
    #[error("key file {path} line {line}: not base64 (a key is one line of standard base64; make one with `shardproxy keygen`)")]
    Malformed {
        /// The path.
        path: String,
        /// 1-based line number.
        line: usize,
    },
    /// A line decodes to 32 copies of one byte (all zeros: `AAAA...=`): a
    /// placeholder, not a key.
    #[error("key file {path} line {line}: 32 copies of one byte, a placeholder rather than a key (make one with `shardproxy keygen`)")]
    Placeholder {
        /// The path.
        path: String,
        /// 1-based line number.
        line: usize,
    },
    /// A line is base64 of the wrong length.
    #[error("key file {path} line {line}: decodes to {} bytes, but a key is 32 bytes (make one with `shardproxy keygen`)", if *len > PSK_LEN + 8 { "more than 40".to_string() } else { len.to_string() })]
    WrongLength {
        /// The path.
        path: String,
        /// 1-based line number.
        line: usize,
        /// Bytes decoded (at most 48 are counted).
        len: usize,
    },
    /// The file is not UTF-8 text (UTF-16 from some editors, or binary).
    #[error("key file {path} is not UTF-8 text ({what}); save it as UTF-8 or ASCII")]
    NotText {
        /// The path.
        path: String,
        /// What it looks like instead.
        what: &'static str,
    },
    /// The file is larger than a key file can be.
    #[error("key file {path} is larger than {cap} bytes; a key file holds at most 16 keys, one per line")]
    TooLarge {
        /// The path.
        path: String,
        /// The cap, in bytes.
        cap: u64,
    },
    /// No keys at all.
    #[error("key file {path} holds no keys (make one with `shardproxy keygen --out {path}`)")]
    Empty {
        /// The path.
        path: String,
    },
    /// More than [`MAX_KEYS`].
    #[error("key file {path} holds more than {MAX_KEYS} keys")]
    TooMany {
        /// The path.
        path: String,
    },
}

/// Standard base64, with or without `=` padding (some tools strip it).
const LENIENT_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// The keys of one key file, in file order. The first one is the entry's.
#[derive(Clone, Debug)]
pub struct KeySet {
    keys: Vec<Psk>,
}

impl KeySet {
    /// Builds a set from keys (tests, fuzzing).
    pub fn new(keys: Vec<Psk>) -> Self {
        KeySet { keys }
    }

    /// The key an entry uses.
    pub fn primary(&self) -> &Psk {
        &self.keys[0]
    }

    /// Every key, for an exit to try.
    pub fn all(&self) -> &[Psk] {
        &self.keys
    }

    /// Every key's [`Psk::fingerprint`], in file order (index 0 = primary).
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys.iter().map(Psk::fingerprint).collect()
    }

    /// One line for logs: `N key(s), fingerprints 1a2b3c4d (primary), 5e6f7a8b`.
    /// An operator compares these across entries and exits mid-rotation.
    pub fn describe(&self) -> String {
        let fps = self.fingerprints();
        let mut out = format!("{} key(s), fingerprints ", fps.len());
        for (i, fp) in fps.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(fp);
            if i == 0 {
                out.push_str(" (primary)");
            }
        }
        out
    }

    /// Parses key-file text: one base64 key per line, `#` comments and blank
    /// lines allowed. A leading UTF-8 byte-order mark (Windows Notepad), CRLF
    /// line ends, surrounding blanks and a missing final newline are all
    /// accepted. `path` is only used in messages.
    pub fn parse(text: &str, path: &str) -> Result<KeySet, KeyFileError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut keys = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let malformed = || KeyFileError::Malformed {
                path: path.to_string(),
                line: i + 1,
            };
            // Decode into a bounded buffer: a huge line cannot allocate.
            let mut buf = [0u8; 48];
            let n = match LENIENT_BASE64.decode_slice(line, &mut buf) {
                Ok(n) => n,
                // Valid base64 too long for the buffer: far more than a key.
                Err(base64::DecodeSliceError::OutputSliceTooSmall) => buf.len(),
                Err(_) => return Err(malformed()),
            };
            if n != PSK_LEN {
                buf.zeroize();
                return Err(KeyFileError::WrongLength {
                    path: path.to_string(),
                    line: i + 1,
                    len: n,
                });
            }
            let mut k = [0u8; PSK_LEN];
            k.copy_from_slice(&buf[..PSK_LEN]);
            buf.zeroize();
            if k.iter().all(|&b| b == k[0]) {
                return Err(KeyFileError::Placeholder {
                    path: path.to_string(),
                    line: i + 1,
                });
            }
            if keys.len() == MAX_KEYS {
                return Err(KeyFileError::TooMany {
                    path: path.to_string(),
                });
            }
            keys.push(Psk(k));
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty {
                path: path.to_string(),
            });
        }
        Ok(KeySet { keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key whose bytes are not all alike (`i`, `i + 1`, ...).
    fn key(i: u8) -> Psk {
        Psk::from_bytes(std::array::from_fn(|j| i.wrapping_add(j as u8)))
    }

    #[test]
    fn parses_comments_and_rotation() {
        let a = key(1).to_base64();
        let b = key(2).to_base64();
        let text = format!("# new key first\n{a}\n\n  {b}  # old\n");
        let set = KeySet::parse(&text, "k").unwrap();
        assert_eq!(set.all().len(), 2);
        assert_eq!(set.primary().bytes(), key(1).bytes());
    }

    #[test]
    fn rejects_bad_files() {
        assert_eq!(
            KeySet::parse("# nothing\n", "k").unwrap_err(),
            KeyFileError::Empty { path: "k".into() }
        );
        assert!(matches!(
            KeySet::parse("ab!c\n", "k"),
            Err(KeyFileError::Malformed { line: 1, .. })
        ));
        // Unpadded base64 decodes; "abc" is 2 bytes, not a key.
        assert!(matches!(
            KeySet::parse("abc\n", "k"),
            Err(KeyFileError::WrongLength { len: 2, .. })
        ));
        let short = base64::engine::general_purpose::STANDARD.encode([0u8; 16]);
        assert!(matches!(
            KeySet::parse(&short, "k"),
            Err(KeyFileError::WrongLength { len: 16, .. })
        ));
        let long = "A".repeat(10_000);
        assert!(matches!(
            KeySet::parse(&long, "k"),
            Err(KeyFileError::WrongLength { .. })
        ));
        assert!(matches!(
            KeySet::parse("not base64!\n", "k"),
            Err(KeyFileError::Malformed { line: 1, .. })
        ));
        let many: String = (0..17).map(|i| key(i).to_base64() + "\n").collect();
        assert!(matches!(
            KeySet::parse(&many, "k"),
            Err(KeyFileError::TooMany { .. })
        ));
        // A placeholder (all zeros is `AAAA...A=`), among real keys too.
        for b in [0u8, 0xff, b'x'] {
            let text = format!(
                "{}\n{}\n",
                key(1).to_base64(),
                Psk::from_bytes([b; 32]).to_base64()
            );
            assert!(matches!(
                KeySet::parse(&text, "k"),
                Err(KeyFileError::Placeholder { line: 2, .. })
            ));
        }
    }

    #[test]
    fn accepts_the_encodings_editors_write() {
        let a = key(7).to_base64();
        for text in [
            format!("\u{feff}{a}\n"),
            format!("{a}\r\n"),
            format!("\u{feff}{a}\r\n"),
            format!("{a}   \t\n"),
            format!("{}\n", a.trim_end_matches('=')),
            a.clone(),
            format!("\u{feff}# comment\r\n\r\n{a}"),
        ] {
            let set = KeySet::parse(&text, "k").unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(set.primary().bytes(), key(7).bytes());
        }
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let k = Psk::from_bytes([0xab; 32]);
        let shown = format!("{k:?} {:?}", KeySet::new(vec![k.clone()]));
        assert!(
            !shown.contains("171") && !shown.to_lowercase().contains("abab"),
            "{shown}"
        );
        assert!(!shown.contains(&k.to_base64()));
    }
}
