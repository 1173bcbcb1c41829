//! Osprey prompts: the `osprey_v1` conversation template, the task questions, region-count
//! validation and the reference post-processing (docs/MODEL.md#prompt-template-and-tasks).
//!
//! Upstream (CircleRadon/Osprey): `osprey/conversation.py` (`conv_osprey_v1`, `SeparatorStyle.TWO`),
//! `demo/osprey_inference.py` (short/detailed questions and the demo post-processing),
//! `osprey/eval/lvis_paco_eval.py` (category question), `osprey/datasets/osprey_724k.py`
//! (multi-region wording, typo "Ther are" kept because the model was trained on it).

use crate::tokenizer::{IMAGE_PLACEHOLDER, MASK_TOKEN, POS_TOKEN};

/// `conv_osprey_v1.system` (inference wording: "human"; training used "user").
pub const SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. \
                          The assistant gives helpful, detailed, and polite answers to the human's questions.";
pub const USER: &str = "USER";
pub const ASSISTANT: &str = "ASSISTANT";
/// `sep`: after the system prompt and after each user message.
pub const SEP: &str = " ";
/// `sep2`: after each assistant message; also the stop string of the post-processing.
pub const SEP2: &str = "</s>";

/// The demo's overview prefix (double `\n`), used by the short and detailed tasks.
pub const DEMO_OVERVIEW: &str = "<image>\n\nThis provides an overview of the picture.\n";
/// The training overview prefix (single `\n`), used by the category task and free questions.
pub const TRAIN_OVERVIEW: &str = "<image>\nThis provides an overview of the picture.\n";

/// The region-centric tasks with fixed wording, each about one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// Demo "short description".
    Short,
    /// Demo "detailed description".
    Detailed,
    /// LVIS/PACO evaluation: one word or phrase.
    Category,
}

impl Task {
    /// The user message (`qs`) of this task, `<image>` and one `<mask><pos>` included.
    pub fn question(self) -> String {
        match self {
            Task::Short => format!(
                "{DEMO_OVERVIEW}Please give me a short description of {MASK_TOKEN}{POS_TOKEN}. Using a short phrase."
            ),
            Task::Detailed => {
                format!("{DEMO_OVERVIEW}Can you give me a detailed description of {MASK_TOKEN}{POS_TOKEN}?")
            }
            Task::Category => format!(
                "{TRAIN_OVERVIEW}What is the category of {MASK_TOKEN}{POS_TOKEN}? Using only one word or phrase."
            ),
        }
    }

    /// The post-processing the reference script of this task applies.
    pub fn post_process(self) -> PostProcess {
        match self {
            Task::Short | Task::Detailed => PostProcess::Demo,
            Task::Category => PostProcess::AfterColon,
        }
    }

    /// The full prompt (`"{system} USER: {qs} ASSISTANT:"`).
    pub fn prompt(self) -> String {
        single_turn_prompt(&self.question())
    }
}

/// One exchange of a conversation: a user message and, for past turns, the assistant's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub user: String,
    /// `None` for the turn being asked.
    pub assistant: Option<String>,
}

/// `Conversation.get_prompt()` with `SeparatorStyle.TWO`: `system + " "`, then per message
/// `"ROLE: message" + [" ", "</s>"][i % 2]`, or `"ROLE:"` for an empty message (Python's
/// `if message:` treats `""` like `None`). The last turn normally has no answer, giving
/// `"... USER: q ASSISTANT:"`.
pub fn conversation_prompt(system: &str, turns: &[Turn]) -> String {
    let mut out = format!("{system}{SEP}");
    for turn in turns {
        for (i, (role, message)) in
            [(USER, Some(turn.user.as_str())), (ASSISTANT, turn.assistant.as_deref())].into_iter().enumerate()
        {
            match message {
                Some(m) if !m.is_empty() => {
                    out.push_str(role);
                    out.push_str(": ");
                    out.push_str(m);
                    out.push_str(if i == 0 { SEP } else { SEP2 });
                }
                _ => {
                    out.push_str(role);
                    out.push(':');
                }
            }
        }
    }
    out
}

/// `"{SYSTEM} USER: {qs} ASSISTANT:"`.
pub fn single_turn_prompt(qs: &str) -> String {
    conversation_prompt(SYSTEM, &[Turn { user: qs.to_string(), assistant: None }])
}

/// The training wording that binds `region1..regionN` to the `<mask><pos>` pairs
/// (`osprey_724k.py`, typo included): `"Ther are 2 part regions in the picture:
/// region1<mask><pos>,region2<mask><pos>. "`, singular for one region.
pub fn region_binding(n_regions: usize) -> Result<String, PromptError> {
    if n_regions == 0 {
        return Err(PromptError::NoRegions);
    }
    let list: Vec<String> = (1..=n_regions).map(|i| format!("region{i}{MASK_TOKEN}{POS_TOKEN}")).collect();
    let list = list.join(",");
    Ok(if n_regions == 1 {
        format!("Ther are 1 part region in the picture: {list}. ")
    } else {
        format!("Ther are {n_regions} part regions in the picture: {list}. ")
    })
}

/// Removes `<` and `>` from user text, as training did to every question and answer
/// (`question.replace('<','').replace('>','')`): `<region1>` becomes `region1`, and user text can
/// never smuggle in `<mask>`, `<pos>` or `<image>`.
pub fn sanitize_user_text(text: &str) -> String {
    text.chars().filter(|&c| c != '<' && c != '>').collect()
}

/// A multi-turn conversation about `n_regions` regions (training layout): the first user message
/// is `TRAIN_OVERVIEW + region_binding(n) + question`, later ones are the bare questions. User
/// text and past answers are sanitized ([`sanitize_user_text`]); a `regionK` mention with
/// `K > n_regions` is rejected.
pub fn region_chat_prompt(n_regions: usize, turns: &[Turn]) -> Result<String, PromptError> {
    let prefix = format!("{TRAIN_OVERVIEW}{}", region_binding(n_regions)?);
    chat_prompt(&prefix, n_regions, turns)
}

/// A conversation about the whole image, without regions (as the POPE evaluation asks): the
/// first user message is `"<image>\n" + question`.
pub fn image_chat_prompt(turns: &[Turn]) -> Result<String, PromptError> {
    chat_prompt("<image>\n", 0, turns)
}

/// The conversation with `first_prefix` before the first question; see [`region_chat_prompt`].
fn chat_prompt(first_prefix: &str, n_regions: usize, turns: &[Turn]) -> Result<String, PromptError> {
    if turns.is_empty() {
        return Err(PromptError::EmptyConversation);
    }
    if turns[..turns.len() - 1].iter().any(|t| t.assistant.is_none()) {
        return Err(PromptError::UnansweredTurn);
    }
    let mut out = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let question = sanitize_user_text(&turn.user);
        check_region_mentions(&question, n_regions)?;
        let user = if i == 0 { format!("{first_prefix}{question}") } else { question };
        out.push(Turn { user, assistant: turn.assistant.as_deref().map(sanitize_user_text) });
    }
    let prompt = conversation_prompt(SYSTEM, &out);
    validate_region_pairs(&prompt, n_regions)?;
    Ok(prompt)
}

/// A single free question about `n_regions` regions (see [`region_chat_prompt`]).
pub fn free_question_prompt(n_regions: usize, question: &str) -> Result<String, PromptError> {
    region_chat_prompt(n_regions, &[Turn { user: question.to_string(), assistant: None }])
}

/// A single-turn prompt whose user message is given whole, as the evaluation scripts write it
/// (e.g. RefCOCOg's `"<image>\n...Please give me a short description of <mask><pos>."`): it must
/// hold `<image>` once and exactly `n_regions` `<mask><pos>` pairs.
pub fn verbatim_prompt(n_regions: usize, user: &str) -> Result<String, PromptError> {
    let prompt = single_turn_prompt(user);
    validate_region_pairs(&prompt, n_regions)?;
    Ok(prompt)
}

/// `regionK` mentions must name a bound region (1..=n). `region` followed by no digits is text.
fn check_region_mentions(text: &str, n_regions: usize) -> Result<(), PromptError> {
    let mut rest = text;
    while let Some(at) = rest.find("region") {
        let after = &rest[at + "region".len()..];
        let digits: &str = &after[..after.find(|c: char| !c.is_ascii_digit()).unwrap_or(after.len())];
        if !digits.is_empty() {
            let k: usize = digits.parse().unwrap_or(usize::MAX);
            if k == 0 || k > n_regions {
                return Err(PromptError::UnknownRegion {
                    mention: format!("region{digits}"),
                    regions: n_regions,
                });
            }
        }
        rest = after;
    }
    Ok(())
}

/// Counts the `<mask><pos>` pairs of a prompt, rejecting a `<mask>` not immediately followed by
/// `<pos>` and a `<pos>` not right after a `<mask>` (the splice would silently misplace tokens).
pub fn count_region_pairs(prompt: &str) -> Result<usize, PromptError> {
    let mut pairs = 0;
    let mut i = 0;
    while i < prompt.len() {
        let rest = &prompt[i..];
        if let Some(after) = rest.strip_prefix(MASK_TOKEN) {
            if !after.starts_with(POS_TOKEN) {
                return Err(PromptError::MaskWithoutPos { at: Location::Byte(i) });
            }
            pairs += 1;
            i += MASK_TOKEN.len() + POS_TOKEN.len();
        } else if rest.starts_with(POS_TOKEN) {
            return Err(PromptError::PosWithoutMask { at: Location::Byte(i) });
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    Ok(pairs)
}

/// The prompt must hold exactly `n_regions` well-formed `<mask><pos>` pairs and one `<image>`.
pub fn validate_region_pairs(prompt: &str, n_regions: usize) -> Result<(), PromptError> {
    let images = prompt.matches(IMAGE_PLACEHOLDER).count();
    if images != 1 {
        return Err(PromptError::ImageCount { found: images, expected: 1 });
    }
    let pairs = count_region_pairs(prompt)?;
    if pairs != n_regions {
        return Err(PromptError::RegionCount { pairs, regions: n_regions });
    }
    Ok(())
}

/// Where in a prompt a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Byte offset in the prompt text.
    Byte(usize),
    /// Index in the token ids.
    Token(usize),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Byte(i) => write!(f, "byte {i}"),
            Location::Token(i) => write!(f, "token {i}"),
        }
    }
}

/// An invalid prompt or region binding; all of these are the client's fault (INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("<mask> at {at} is not followed by <pos>")]
    MaskWithoutPos { at: Location },
    #[error("<pos> at {at} does not follow a <mask>")]
    PosWithoutMask { at: Location },
    #[error("the prompt has {pairs} <mask><pos> pairs but {regions} regions were given")]
    RegionCount { pairs: usize, regions: usize },
    #[error("the prompt has {found} images, expected {expected}")]
    ImageCount { found: usize, expected: usize },
    #[error("the question mentions {mention} but there are {regions} regions")]
    UnknownRegion { mention: String, regions: usize },
    #[error("token id {id} at {at} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange { id: i64, at: Location, vocab_size: usize },
    #[error("a region question needs at least one region")]
    NoRegions,
    #[error("the conversation has no turns")]
    EmptyConversation,
    #[error("only the last turn may be unanswered")]
    UnansweredTurn,
}

/// Which reference post-processing to apply to a decoded answer
/// (docs/MODEL.md#prompt-template-and-tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostProcess {
    /// Strip, drop a trailing `</s>`, strip.
    Plain,
    /// `Plain`, then the LVIS/PACO/RefCOCOg/description scripts' `split(':')[1]` when there is a `:`.
    AfterColon,
    /// `AfterColon`, then the demo's sentence dedup: split on `.` and stop at the first repeat.
    Demo,
}

/// Python's `str.isspace()` for one char: Unicode White_Space plus the separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The reference post-processing of `batch_decode(skip_special_tokens=True)` output.
pub fn post_process(text: &str, mode: PostProcess) -> String {
    let mut out = text.trim_matches(is_py_space);
    if let Some(s) = out.strip_suffix(SEP2) {
        out = s;
    }
    let mut out = out.trim_matches(is_py_space).to_string();
    if mode == PostProcess::Plain {
        return out;
    }
    if out.contains(':') {
        // `split(':')[1]`: the text between the first and the second colon, as the scripts do.
        out = out.split(':').nth(1).unwrap_or_default().to_string();
    }
    if mode == PostProcess::AfterColon {
        return out;
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut result = String::new();
    for sentence in out.split('.') {
        if kept.contains(&sentence) {
            break;
        }
        if sentence.is_empty() {
            continue;
        }
        kept.push(sentence);
        result.push_str(sentence);
        result.push('.');
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYS: &str = "A chat between a curious human and an artificial intelligence assistant. The assistant \
                       gives helpful, detailed, and polite answers to the human's questions.";

    #[test]
    fn task_prompts_are_the_reference_strings() {
        assert_eq!(SYSTEM, SYS);
        assert_eq!(
            Task::Short.prompt(),
            format!(
                "{SYS} USER: <image>\n\nThis provides an overview of the picture.\nPlease give me a short \
                 description of <mask><pos>. Using a short phrase. ASSISTANT:"
            )
        );
        assert_eq!(
            Task::Detailed.prompt(),
            format!(
                "{SYS} USER: <image>\n\nThis provides an overview of the picture.\nCan you give me a detailed \
                 description of <mask><pos>? ASSISTANT:"
            )
        );
        assert_eq!(
            Task::Category.prompt(),
            format!(
                "{SYS} USER: <image>\nThis provides an overview of the picture.\nWhat is the category of \
                 <mask><pos>? Using only one word or phrase. ASSISTANT:"
            )
        );
        for task in [Task::Short, Task::Detailed, Task::Category] {
            validate_region_pairs(&task.prompt(), 1).unwrap();
        }
    }

    #[test]
    fn multi_turn_template() {
        let turns = [
            Turn { user: "q1".into(), assistant: Some("a1".into()) },
            Turn { user: "q2".into(), assistant: None },
        ];
        assert_eq!(conversation_prompt("S", &turns), "S USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:");
        // An empty message is rendered like a missing one.
        let turns = [Turn { user: String::new(), assistant: None }];
        assert_eq!(conversation_prompt("S", &turns), "S USER:ASSISTANT:");
    }

    #[test]
    fn verbatim_prompts_are_taken_whole_and_counted() {
        assert_eq!(verbatim_prompt(1, &Task::Category.question()).unwrap(), Task::Category.prompt());
        let two = "<image>\nIs <mask><pos> left of <mask><pos>?";
        assert_eq!(verbatim_prompt(2, two).unwrap(), format!("{SYS} USER: {two} ASSISTANT:"));
        assert_eq!(verbatim_prompt(1, two), Err(PromptError::RegionCount { pairs: 2, regions: 1 }));
        assert!(matches!(verbatim_prompt(0, "no image"), Err(PromptError::ImageCount { found: 0, .. })));
        assert!(matches!(
            verbatim_prompt(1, "<image> <mask> <pos>"),
            Err(PromptError::MaskWithoutPos { .. })
        ));
    }

    #[test]
    fn free_questions_bind_regions_with_the_training_wording() {
        assert_eq!(
            free_question_prompt(2, "What is region1 doing?").unwrap(),
            format!(
                "{SYS} USER: <image>\nThis provides an overview of the picture.\nTher are 2 part regions in the \
                 picture: region1<mask><pos>,region2<mask><pos>. What is region1 doing? ASSISTANT:"
            )
        );
        assert_eq!(
            free_question_prompt(1, "Describe <region1>.").unwrap(),
            format!(
                "{SYS} USER: <image>\nThis provides an overview of the picture.\nTher are 1 part region in the \
                 picture: region1<mask><pos>. Describe region1. ASSISTANT:"
            )
        );
        let chat = region_chat_prompt(
            3,
            &[
                Turn { user: "Compare region1 and region3.".into(), assistant: Some("They differ.".into()) },
                Turn { user: "And region2?".into(), assistant: None },
            ],
        )
        .unwrap();
        assert_eq!(
            chat,
            format!(
                "{SYS} USER: <image>\nThis provides an overview of the picture.\nTher are 3 part regions in the \
                 picture: region1<mask><pos>,region2<mask><pos>,region3<mask><pos>. Compare region1 and region3. \
                 ASSISTANT: They differ.</s>USER: And region2? ASSISTANT:"
            )
        );
        // Injected placeholders lose their brackets; they cannot add region slots or images.
        let p = free_question_prompt(1, "Is <mask><pos> in <image>?").unwrap();
        assert_eq!(count_region_pairs(&p).unwrap(), 1);
        assert!(p.ends_with("Is maskpos in image? ASSISTANT:"));
    }

    #[test]
    fn region_errors() {
        assert_eq!(free_question_prompt(0, "hi"), Err(PromptError::NoRegions));
        assert_eq!(
            free_question_prompt(2, "What about region3?"),
            Err(PromptError::UnknownRegion { mention: "region3".into(), regions: 2 })
        );
        assert_eq!(
            free_question_prompt(2, "What about region0?"),
            Err(PromptError::UnknownRegion { mention: "region0".into(), regions: 2 })
        );
        assert!(free_question_prompt(2, "the regional region").is_ok());
        assert_eq!(
            region_chat_prompt(
                1,
                &[Turn { user: "a".into(), assistant: None }, Turn { user: "b".into(), assistant: None }]
            ),
            Err(PromptError::UnansweredTurn)
        );
        assert_eq!(region_chat_prompt(1, &[]), Err(PromptError::EmptyConversation));
        assert_eq!(
            count_region_pairs("a <mask> b"),
            Err(PromptError::MaskWithoutPos { at: Location::Byte(2) })
        );
        assert_eq!(
            count_region_pairs("<mask><pos><pos>"),
            Err(PromptError::PosWithoutMask { at: Location::Byte(11) })
        );
        assert_eq!(count_region_pairs("é<mask><pos>,<mask><pos>").unwrap(), 2);
        assert_eq!(
            validate_region_pairs(&Task::Short.prompt(), 2),
            Err(PromptError::RegionCount { pairs: 1, regions: 2 })
        );
        assert_eq!(
            validate_region_pairs("<mask><pos>", 1),
            Err(PromptError::ImageCount { found: 0, expected: 1 })
        );
        assert_eq!(
            PromptError::RegionCount { pairs: 1, regions: 2 }.to_string(),
            "the prompt has 1 <mask><pos> pairs but 2 regions were given"
        );
    }

    #[test]
    fn post_processing_matches_the_scripts() {
        assert_eq!(post_process("  a dog</s> \n", PostProcess::Plain), "a dog");
        assert_eq!(post_process("\u{1f}a dog\u{a0}", PostProcess::Plain), "a dog");
        // split(':')[1] keeps only the text between the first two colons.
        assert_eq!(post_process("Region: a dog: brown", PostProcess::AfterColon), " a dog");
        assert_eq!(post_process("a dog", PostProcess::AfterColon), "a dog");
        // Demo: sentences up to the first repeat, empty pieces skipped, each re-terminated by '.'.
        assert_eq!(post_process("A dog. It runs. It runs. Again.", PostProcess::Demo), "A dog. It runs.");
        assert_eq!(post_process("A dog.A dog.More.", PostProcess::Demo), "A dog.");
        assert_eq!(post_process("x..y", PostProcess::Demo), "x.y.");
        assert_eq!(post_process("<mask>: a cat. a cat.</s>", PostProcess::Demo), " a cat.");
        assert_eq!(post_process("", PostProcess::Demo), "");
    }
}
