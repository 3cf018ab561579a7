//! Byte counts as people write them on a command line or in a config file.

use std::fmt;
use std::str::FromStr;

/// A number of bytes: plain (`65536`) or with a unit, 1024-based as nginx
/// and most servers read them (`64K` = `64KiB` = `64KB` = 65536, `1M`,
/// `1GiB`; case and the `B` do not matter). Shown in the largest unit that
/// divides it, so `--help` prints `1GiB`, not `1073741824`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_size::Config::new()
            .with_binary()
            .parse_size(s.trim())
            .map(ByteSize)
            .map_err(|e| format!("{s:?} is not a size: {e} (use bytes, or a unit: 64KiB, 1MiB, 1GiB)"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match UNITS.iter().find(|(unit, _)| self.0 != 0 && self.0.is_multiple_of(*unit)) {
            Some((unit, name)) => write!(f, "{}{name}", self.0 / unit),
            None => write!(f, "{}", self.0),
        }
    }
}

impl ByteSize {
    /// A size within `[min, max]`, for flags whose range is bounded.
    pub fn parse_within(s: &str, min: u64, max: u64) -> Result<ByteSize, String> {
        let size: ByteSize = s.parse()?;
        if size.0 < min || size.0 > max {
            return Err(format!("{size} is outside {}..={}", ByteSize(min), ByteSize(max)));
        }
        Ok(size)
    }

    /// As a `usize`, saturating (sizes past the address space mean "no limit").
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_1024_based_and_optional() {
        let p = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(p("65536"), Ok(65536));
        assert_eq!(p("64KiB"), Ok(64 << 10));
        assert_eq!(p("64K"), Ok(64 << 10));
        assert_eq!(p("64kb"), Ok(64 << 10));
        assert_eq!(p("1M"), Ok(1 << 20));
        assert_eq!(p("1 MiB"), Ok(1 << 20));
        assert_eq!(p("1GiB"), Ok(1 << 30));
        assert_eq!(p("1.5K"), Ok(1536));
        assert!(p("lots").unwrap_err().contains("\"lots\" is not a size"));
        assert!(p("-1").is_err());
    }

    #[test]
    fn shown_in_the_largest_unit_that_divides() {
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
        assert_eq!(ByteSize(64 << 10).to_string(), "64KiB");
        assert_eq!(ByteSize(4094).to_string(), "4094");
        assert_eq!(ByteSize(0).to_string(), "0");
        // What is shown parses back to itself.
        for n in [0, 1, 1023, 1024, 4094, 8190, 65536, 1 << 30, 3 << 20] {
            assert_eq!(ByteSize(n).to_string().parse::<ByteSize>(), Ok(ByteSize(n)));
        }
    }

    #[test]
    fn ranges_name_their_bounds() {
        assert_eq!(ByteSize::parse_within("2K", 1024, 1 << 20), Ok(ByteSize(2048)));
        let e = ByteSize::parse_within("2M", 1024, 1 << 20).unwrap_err();
        assert_eq!(e, "2MiB is outside 1KiB..=1MiB");
    }
}
