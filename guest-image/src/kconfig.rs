//! Kernel config fragments and the check that a built .config has every option asked for.

use std::collections::BTreeMap;

/// `CONFIG_X` → its value ("y", "32", "\"str\"", or "n" for `# CONFIG_X is not set`).
pub fn parse(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("# ").and_then(|r| r.strip_suffix(" is not set")) {
            if rest.starts_with("CONFIG_") {
                map.insert(rest.to_string(), "n".to_string());
            }
        } else if let Some((k, v)) = line.split_once('=') {
            if k.starts_with("CONFIG_") {
                map.insert(k.to_string(), v.to_string());
            }
        }
    }
    map
}

/// Options of the fragment whose value the built config does not have, as
/// "CONFIG_X (wanted y, got n)". An option absent from .config counts as "n".
pub fn missing(fragment: &str, built: &str) -> Vec<String> {
    let built = parse(built);
    parse(fragment)
        .into_iter()
        .filter_map(|(k, want)| {
            let got = built.get(&k).map(String::as_str).unwrap_or("n");
            (got != want).then(|| format!("{k} (wanted {want}, got {got})"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_options_are_named() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=32\n# CONFIG_C is not set\nCONFIG_D=\"x\"\n";
        let built = "CONFIG_A=y\nCONFIG_B=64\nCONFIG_C=y\n";
        assert_eq!(
            missing(fragment, built),
            vec!["CONFIG_B (wanted 32, got 64)", "CONFIG_C (wanted n, got y)", "CONFIG_D (wanted \"x\", got n)"]
        );
        assert!(missing(fragment, "CONFIG_A=y\nCONFIG_B=32\nCONFIG_D=\"x\"\n").is_empty());
    }
}
