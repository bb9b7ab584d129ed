//! Fitting a prompt into the context window.
//!
//! A chat prompt is `<|bos|>`, the first user turn (which carries the system prompt, merged in by
//! the chat renderer), then alternating turns, ending with the newest user turn and
//! `<|assistant_start|>`. When it is too long, whole turns are dropped oldest first while the
//! `<|bos|>` + first-user-turn framing and the newest turn stay; only if that still does not fit
//! is the framing given up, and as a last resort the most recent tokens are kept after `<|bos|>`.

use crate::model::Specials;

/// A prompt after fitting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fitted {
    /// The tokens to prefill.
    pub tokens: Vec<u32>,
    /// How many prompt tokens were left out (0 when it fit).
    pub dropped: usize,
    /// How the prompt was shortened.
    pub strategy: FitStrategy,
}

/// Which rule produced a [`Fitted`] prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FitStrategy {
    /// The prompt fit unchanged.
    Unchanged,
    /// Oldest whole turns were dropped; framing and newest turn kept.
    DroppedTurns,
    /// Only `<|bos|>` and the newest turn were kept.
    NewestTurn,
    /// `<|bos|>` (if present) and the most recent tokens were kept.
    RecentTokens,
}

/// Shortens `prompt` to at most `budget` tokens (see the module docs for the rules).
pub fn fit_prompt(prompt: &[u32], budget: usize, specials: &Specials) -> Fitted {
    let done = |tokens: Vec<u32>, strategy| Fitted {
        dropped: prompt.len() - tokens.len(),
        tokens,
        strategy,
    };
    if prompt.len() <= budget {
        return done(prompt.to_vec(), FitStrategy::Unchanged);
    }
    let head_len = usize::from(specials.bos.is_some() && prompt.first() == specials.bos.as_ref());
    if budget <= head_len {
        return done(
            prompt[prompt.len() - budget..].to_vec(),
            FitStrategy::RecentTokens,
        );
    }
    let head = &prompt[..head_len];
    if let (Some(us), Some(ue)) = (specials.user_start, specials.user_end) {
        let starts: Vec<usize> = (head_len..prompt.len())
            .filter(|&i| prompt[i] == us)
            .collect();
        let framing_end = starts
            .first()
            .filter(|&&s| s == head_len)
            .and_then(|&s| prompt[s..].iter().position(|&t| t == ue).map(|p| s + p + 1));
        if let (Some(framing_end), Some(&last_start)) = (framing_end, starts.last()) {
            if last_start >= framing_end {
                let framing = &prompt[head_len..framing_end];
                // Candidate cut points: each later turn start, oldest first; the newest stays.
                let cuts = starts.iter().copied().filter(|&s| s >= framing_end);
                for cut in cuts {
                    let kept = head.len() + framing.len() + (prompt.len() - cut);
                    if kept <= budget {
                        let mut t = Vec::with_capacity(kept);
                        t.extend_from_slice(head);
                        t.extend_from_slice(framing);
                        t.extend_from_slice(&prompt[cut..]);
                        return done(t, FitStrategy::DroppedTurns);
                    }
                }
                if head.len() + prompt.len() - last_start <= budget {
                    let mut t = head.to_vec();
                    t.extend_from_slice(&prompt[last_start..]);
                    return done(t, FitStrategy::NewestTurn);
                }
            }
        }
    }
    let mut t = head.to_vec();
    t.extend_from_slice(&prompt[prompt.len() - (budget - head_len)..]);
    done(t, FitStrategy::RecentTokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOS: u32 = 100;
    const US: u32 = 101;
    const UE: u32 = 102;
    const AS: u32 = 103;
    const AE: u32 = 104;

    fn specials() -> Specials {
        Specials {
            bos: Some(BOS),
            user_start: Some(US),
            user_end: Some(UE),
            assistant_end: Some(AE),
            ..Default::default()
        }
    }

    /// bos, user(sys+q1), asst(a1), user(q2), asst(a2), user(q3), assistant_start
    fn convo() -> Vec<u32> {
        let mut v = vec![BOS, US, 1, 1, 1, UE, AS, 2, 2, AE];
        v.extend([US, 3, 3, UE, AS, 4, 4, 4, AE]);
        v.extend([US, 5, UE, AS]);
        v
    }

    #[test]
    fn fits_unchanged() {
        let p = convo();
        let f = fit_prompt(&p, p.len(), &specials());
        assert_eq!(f.tokens, p);
        assert_eq!(f.dropped, 0);
        assert_eq!(f.strategy, FitStrategy::Unchanged);
    }

    #[test]
    fn drops_oldest_turns_first_keeping_framing() {
        let p = convo();
        // Dropping the first assistant reply (4 tokens) is enough.
        let f = fit_prompt(&p, p.len() - 4, &specials());
        assert_eq!(f.strategy, FitStrategy::DroppedTurns);
        assert_eq!(&f.tokens[..6], &[BOS, US, 1, 1, 1, UE]);
        assert_eq!(&f.tokens[6..10], &[US, 3, 3, UE]);
        // Tighter: drop the second exchange too.
        let f = fit_prompt(&p, 10, &specials());
        assert_eq!(f.tokens, vec![BOS, US, 1, 1, 1, UE, US, 5, UE, AS]);
        assert_eq!(f.dropped, p.len() - 10);
    }

    #[test]
    fn falls_back_to_newest_turn_then_recent_tokens() {
        let p = convo();
        let f = fit_prompt(&p, 5, &specials());
        assert_eq!(f.strategy, FitStrategy::NewestTurn);
        assert_eq!(f.tokens, vec![BOS, US, 5, UE, AS]);
        let f = fit_prompt(&p, 3, &specials());
        assert_eq!(f.strategy, FitStrategy::RecentTokens);
        assert_eq!(f.tokens, vec![BOS, UE, AS]);
    }

    #[test]
    fn plain_text_keeps_bos_and_recent_tokens() {
        let p: Vec<u32> = std::iter::once(BOS).chain(0..20).collect();
        let f = fit_prompt(&p, 6, &specials());
        assert_eq!(f.tokens, vec![BOS, 15, 16, 17, 18, 19]);
        let q: Vec<u32> = (0..20).collect();
        assert_eq!(fit_prompt(&q, 3, &specials()).tokens, vec![17, 18, 19]);
    }
}
