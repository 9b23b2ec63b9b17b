//! Which queued job runs next: oldest first, with a bounded preference for
//! jobs whose model is already loaded.

/// Pick from the queue (oldest first): the head, unless a later job's model
/// is loaded and the head has been skipped fewer than `limit` times.
pub fn choose(
    queue: &[(String, String)],
    loaded: &[String],
    skips: &mut u32,
    limit: u32,
) -> Option<String> {
    let (head, head_model) = queue.first()?;
    if loaded.iter().any(|m| m == head_model) || *skips >= limit {
        *skips = 0;
        return Some(head.clone());
    }
    match queue
        .iter()
        .find(|(_, model)| loaded.iter().any(|m| m == model))
    {
        Some((id, _)) => {
            *skips += 1;
            Some(id.clone())
        }
        None => {
            *skips = 0;
            Some(head.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn loaded_model_goes_first_but_not_forever() {
        let queue = q(&[("a", "m1"), ("b", "m2"), ("c", "m2")]);
        let loaded = vec!["m2".to_string()];
        let mut skips = 0;
        assert_eq!(choose(&queue, &loaded, &mut skips, 2).as_deref(), Some("b"));
        assert_eq!(
            choose(
                &queue[..1]
                    .iter()
                    .chain(&queue[2..])
                    .cloned()
                    .collect::<Vec<_>>(),
                &loaded,
                &mut skips,
                2
            )
            .as_deref(),
            Some("c")
        );
        // Two skips used: the oldest job runs now.
        assert_eq!(choose(&queue, &loaded, &mut skips, 2).as_deref(), Some("a"));
        assert_eq!(skips, 0);
        // Nothing loaded: strict order.
        assert_eq!(choose(&queue, &[], &mut skips, 2).as_deref(), Some("a"));
        assert_eq!(choose(&[], &loaded, &mut skips, 2), None);
    }
}
