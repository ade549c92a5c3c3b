//! The template hashes controllers name their children by: FNV over a deterministic dump of
//! the template, printed in decimal with each digit mapped as `rand.SafeEncodeString` does.

const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
const OFFSET: u32 = 0x811c_9dc5;
const PRIME: u32 = 0x0100_0193;

/// 32-bit FNV-1a (xor, then multiply), as `pod-template-hash` uses.
pub fn fnv1a32(chunks: &[&[u8]]) -> u32 {
    let mut h = OFFSET;
    for b in chunks.iter().flat_map(|c| c.iter()) {
        h ^= u32::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// 32-bit FNV-1 (multiply, then xor), as ControllerRevision names use.
pub fn fnv32(chunks: &[&[u8]]) -> u32 {
    let mut h = OFFSET;
    for b in chunks.iter().flat_map(|c| c.iter()) {
        h = h.wrapping_mul(PRIME);
        h ^= u32::from(*b);
    }
    h
}

/// `rand.SafeEncodeString` of the decimal form.
pub fn safe_encode(n: u32) -> String {
    n.to_string()
        .bytes()
        .map(|d| char::from(ALPHABET[usize::from(d) % ALPHABET.len()]))
        .collect()
}

/// `controller.ComputeHash`: the template, then the collision count (little-endian u32 and
/// four zero bytes) when there is one. The template's JSON stands in for go-spew's dump: it
/// is deterministic, so equal templates hash equal, which is what the name needs.
pub fn pod_template_hash(template: &serde_json::Value, collision_count: Option<i32>) -> String {
    let dump = template.to_string();
    let extra = collision_count.map(|c| {
        let mut b = (c as u32).to_le_bytes().to_vec();
        b.extend_from_slice(&[0; 4]);
        b
    });
    let mut chunks: Vec<&[u8]> = vec![dump.as_bytes()];
    if let Some(e) = &extra {
        chunks.push(e);
    }
    safe_encode(fnv1a32(&chunks))
}

/// `history.HashControllerRevision`: FNV-32 of the revision data plus the collision count
/// in decimal.
pub fn revision_hash(data: &serde_json::Value, collision_count: Option<i32>) -> String {
    let dump = data.to_string();
    let count = collision_count.map(|c| c.to_string()).unwrap_or_default();
    safe_encode(fnv32(&[dump.as_bytes(), count.as_bytes()]))
}

/// `names.SimpleNameGenerator`: base cut to 58 characters plus five random ones from the
/// same alphabet (the API server does this for generateName; controllers that need a
/// random suffix of their own, such as the kubelet's volume names, use it too).
pub fn random_suffix(n: usize) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = jiff::Timestamp::now().as_nanosecond() as u64
        ^ COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(ALPHABET[(x % ALPHABET.len() as u64) as usize])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_map_as_safe_encode_does() {
        // 0→4 1→5 … 9→f (KUBERNETES-SIM.md §1).
        assert_eq!(safe_encode(1_234_567_890), "56789bcdf4");
    }

    #[test]
    fn fnv_reference_values() {
        // Published FNV test vectors for "a".
        assert_eq!(fnv1a32(&[b"a"]), 0xe40c_292c);
        assert_eq!(fnv32(&[b"a"]), 0x050c_5d7e);
    }

    #[test]
    fn collision_count_changes_the_hash() {
        let t = serde_json::json!({"spec": {"containers": []}});
        assert_ne!(pod_template_hash(&t, None), pod_template_hash(&t, Some(1)));
        assert_eq!(pod_template_hash(&t, None), pod_template_hash(&t, None));
    }
}
