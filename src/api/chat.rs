//! [`Conversation`]: a chat that keeps its session between turns, so that each reply
//! prefills only what is new (the user's message and the template around it), not the whole
//! history; history beyond the context is dropped oldest turn first.

use anyhow::bail;

use super::engine::{Completion, Engine, GenerateOptions, Prompt};
use crate::engine::Session;
use crate::model::chat::ChatMessage;

/// A conversation with the model, turn by turn.
pub struct Conversation<'e> {
    engine: &'e Engine,
    session: Session<'e>,
    /// The system message, kept when old turns are dropped.
    system: Option<ChatMessage>,
    /// User and assistant messages, oldest first.
    turns: Vec<ChatMessage>,
    /// The tokens whose keys and values the session's cache holds, in order.
    cached: Vec<u32>,
}

/// One reply and what it cost the history.
pub struct Reply {
    /// The reply.
    pub completion: Completion,
    /// Earlier exchanges (a user message and its reply) dropped to make room.
    pub dropped: usize,
}

impl<'e> Conversation<'e> {
    /// A conversation over the engine's whole context, opened by `system` if given.
    pub fn new(engine: &'e Engine, system: Option<&str>) -> anyhow::Result<Conversation<'e>> {
        let ctx = engine.context();
        Ok(Conversation {
            engine,
            session: engine.runner().session(ctx)?,
            system: system.map(|s| ChatMessage::new("system", s)),
            turns: Vec::new(),
            cached: Vec::new(),
        })
    }

    /// Forgets every turn (the system message stays).
    pub fn reset(&mut self) {
        self.turns.clear();
        self.cached.clear();
        self.session.reset();
    }

    /// The messages the model sees next, system first.
    pub fn messages(&self) -> Vec<ChatMessage> {
        self.system.iter().chain(&self.turns).cloned().collect()
    }

    /// Replies to `user`, streaming the text through `on_text` (false stops the reply). The
    /// reply, even a stopped one, joins the history.
    pub fn reply(
        &mut self,
        user: &str,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> anyhow::Result<Reply> {
        self.turns.push(ChatMessage::new("user", user));
        let (ids, dropped) = match self.fit(opts.max_tokens) {
            Ok(fit) => fit,
            Err(e) => {
                self.turns.pop();
                return Err(e);
            }
        };
        // Reuse the cache up to where the new rendering departs from it; at least the last
        // token is run again, for the logits the first new token comes from.
        let keep = common_prefix(&self.cached, &ids).min(ids.len() - 1);
        self.session.truncate(keep);
        self.cached.truncate(keep);
        let completion = self
            .engine
            .generate_in(&mut self.session, &ids, keep, opts, on_text)?;
        let held = self.session.position();
        self.cached = ids
            .iter()
            .chain(&completion.tokens)
            .copied()
            .take(held)
            .collect();
        self.turns
            .push(ChatMessage::new("assistant", completion.text.clone()));
        Ok(Reply {
            completion,
            dropped,
        })
    }

    /// The rendered history's tokens once it leaves room for `max_tokens`, dropping the
    /// oldest exchanges as needed; how many were dropped. When even the newest message alone
    /// does not fit, nothing is dropped and the error says so.
    fn fit(&mut self, max_tokens: usize) -> anyhow::Result<(Vec<u32>, usize)> {
        let ctx = self.engine.context();
        let mut turns = self.turns.clone();
        let mut dropped = 0;
        loop {
            let messages: Vec<ChatMessage> = self.system.iter().chain(&turns).cloned().collect();
            let ids = self.engine.encode(&Prompt::Chat(&messages))?;
            if ids.len() + max_tokens.min(ctx / 2) < ctx {
                self.turns = turns;
                return Ok((ids, dropped));
            }
            if turns.len() <= 1 {
                bail!(
                    "the message is {} tokens with the template, and the context holds {ctx} \
                     (with room for the reply): shorten it or open a longer context",
                    ids.len()
                );
            }
            // The oldest user message and the reply to it.
            turns.drain(..2.min(turns.len() - 1));
            dropped += 1;
        }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
