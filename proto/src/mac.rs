//! A MAC address as both sides write it: six two-digit hex bytes separated by colons
//! ("02:ab:00:01:10:ff", `ip link`'s form). The runtime writes it into `Interface.mac` and
//! hull-vmm's `--net mac=`; the agent and hull-vmm parse it.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a MAC address (six two-digit hex bytes separated by colons).")]
pub struct MacError(pub String);

impl FromStr for Mac {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Mac, MacError> {
        let bad = || MacError(s.into());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in mac.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(mac))
    }
}

impl TryFrom<&[u8]> for Mac {
    type Error = MacError;
    fn try_from(b: &[u8]) -> Result<Mac, MacError> {
        b.try_into().map(Mac).map_err(|_| MacError(format!("{b:02x?}")))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip_and_nothing_else_parses() {
        let mac: Mac = "02:ab:00:01:10:FF".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0xab, 0, 1, 0x10, 0xff]);
        assert_eq!(mac.to_string(), "02:ab:00:01:10:ff");
        for bad in ["02:ab:00:01:10", "02:ab:00:01:10:ff:00", "2:ab:00:01:10:ff", "+2:ab:00:01:10:ff", "zz:ab:00:01:10:ff", ""] {
            assert_eq!(bad.parse::<Mac>(), Err(MacError(bad.into())), "{bad}");
        }
        assert_eq!(Mac::try_from(&[1u8, 2, 3, 4, 5, 6][..]).unwrap().to_string(), "01:02:03:04:05:06");
        assert!(Mac::try_from(&[1u8, 2][..]).is_err());
    }
}
