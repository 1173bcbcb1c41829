//! Rendezvous (highest random weight) hashing of image keys over worker replicas: every request
//! about an image goes to the same replica, where its features are resident; when a replica
//! leaves, only its images move, and when it comes back they return to it.

/// Replicas in the order to try them for `image_key`: the preferred one first, then the
/// fall-backs. Stable for a given set of replica addresses, whatever their order.
pub fn rank<'a>(image_key: &str, replicas: &'a [String]) -> Vec<&'a str> {
    let mut scored: Vec<(u64, &str)> = replicas.iter().map(|r| (weight(image_key, r), r.as_str())).collect();
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.into_iter().map(|(_, replica)| replica).collect()
}

fn weight(image_key: &str, replica: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(replica.len() as u64).to_le_bytes());
    hasher.update(replica.as_bytes());
    hasher.update(image_key.as_bytes());
    let digest = hasher.finalize();
    u64::from_le_bytes(
        digest.as_bytes()[..8].try_into().expect("a BLAKE3 digest has 32 bytes. This is a bug."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://10.0.0.{i}:50052")).collect()
    }

    #[test]
    fn stable_balanced_and_minimal_movement() {
        let five = replicas(5);
        let keys: Vec<String> = (0..5000).map(|i| format!("image-{i}")).collect();
        let mut counts = [0usize; 5];
        for key in &keys {
            let first = rank(key, &five)[0];
            counts[five.iter().position(|r| r == first).unwrap()] += 1;
            // Order of the replica list does not matter.
            let mut shuffled = five.clone();
            shuffled.reverse();
            assert_eq!(rank(key, &shuffled), rank(key, &five));
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "unbalanced: {counts:?}");

        // Removing replica 2 moves only the keys it owned, each to its second choice.
        let four: Vec<String> = five.iter().filter(|r| !r.ends_with(".2:50052")).cloned().collect();
        for key in &keys {
            let before = rank(key, &five);
            let after = rank(key, &four)[0];
            if before[0] == five[2] {
                assert_eq!(after, before[1]);
            } else {
                assert_eq!(after, before[0]);
            }
        }
        assert!(rank("x", &[]).is_empty());
    }
}
