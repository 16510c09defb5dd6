//! Region names: the unit of data residency and of one Raft group.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest region name accepted; long enough for `provider-area-zone` style names.
pub const REGION_NAME_LEN_MAX: usize = 63;

/// A validated region name: lowercase ASCII letters, digits and `-`, starting
/// with a letter, not ending with `-`, 1 to 63 characters (`eu-west`, `us1`).
/// The same rules as a DNS label, so a region can name hosts and metrics.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Region(String);

/// Why a string is not a region name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid region name {name:?}: {reason}; use lowercase letters, digits and '-', starting with a letter (for example eu-west)")]
pub struct RegionError {
    /// The rejected input.
    pub name: String,
    /// What rule it broke.
    pub reason: &'static str,
}

impl Region {
    /// Checks `name` against the rules above.
    pub fn parse(name: &str) -> Result<Self, RegionError> {
        let fail = |reason| {
            Err(RegionError {
                name: name.to_owned(),
                reason,
            })
        };
        if name.is_empty() {
            return fail("it is empty");
        }
        if name.len() > REGION_NAME_LEN_MAX {
            return fail("it is longer than 63 characters");
        }
        if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return fail("it does not start with a lowercase letter");
        }
        if name.ends_with('-') {
            return fail("it ends with '-'");
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return fail("it contains a character other than a-z, 0-9 and '-'");
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Region {
    type Error = RegionError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Region> for String {
    fn from(value: Region) -> Self {
        value.0
    }
}

impl std::str::FromStr for Region {
    type Err = RegionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_label_names() {
        for ok in ["eu-west", "us1", "a", "ap-south-2"] {
            assert_eq!(Region::parse(ok).expect(ok).as_str(), ok);
        }
    }

    #[test]
    fn rejects_everything_else_with_a_reason() {
        for bad in [
            "",
            "EU",
            "1eu",
            "eu-",
            "eu_west",
            "eu west",
            "é",
            &"a".repeat(64),
        ] {
            let err = Region::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("invalid region name"), "{err}");
        }
    }

    #[test]
    fn decoding_validates() {
        let bytes = bincode::serde::encode_to_vec("Bad Region", bincode::config::standard())
            .expect("encode");
        let decoded: Result<(Region, usize), _> =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard());
        assert!(decoded.is_err());
    }
}
