//! Prompt templates. The Alpaca template is what the trainer formats every example with;
//! `raw` passes the prompt through untouched for scoring clients that format their own.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

pub const ALPACA_TEMPLATE: &str = "Below is an instruction that describes a task. \
Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Template {
    /// The instruction inside the Alpaca template; the response follows `### Response:\n`.
    #[default]
    Alpaca,
    /// The prompt text as given.
    Raw,
}

impl Template {
    /// The prompt text that precedes the response.
    pub fn format_prompt(self, prompt: &str) -> String {
        match self {
            Template::Alpaca => ALPACA_TEMPLATE.replace("{instruction}", prompt),
            Template::Raw => prompt.to_string(),
        }
    }
}

impl FromStr for Template {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "alpaca" => Ok(Template::Alpaca),
            "raw" => Ok(Template::Raw),
            other => Err(Error::Input(format!("unknown template `{other}` (alpaca or raw)"))),
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Template::Alpaca => "alpaca",
            Template::Raw => "raw",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpaca_matches_the_course_template() {
        let p = Template::Alpaca.format_prompt("Say hi.");
        assert_eq!(
            p,
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
        );
        // The course's training template, with the response slot cut off, is the same text.
        let path = crate::testing::shared_data().join("cs336-prompts/alpaca_sft.prompt");
        let t = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("the course's template at {}: {e}", path.display()));
        assert_eq!(t.split("{response}").next().unwrap(), ALPACA_TEMPLATE);
        assert_eq!(Template::Raw.format_prompt("x{instruction}"), "x{instruction}");
        assert_eq!("raw".parse::<Template>().unwrap(), Template::Raw);
        assert!("chatml".parse::<Template>().is_err());
    }
}
