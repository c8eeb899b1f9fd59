#!/usr/bin/env python3
"""Generates deploy/data/default_prefs.jsonl, the preference set `deploy/run.sh` trains on
when no data is given.

The pairs are written so that a small instruct model (SmolLM2-135M-Instruct) learns the
preference within a few dozen DPO steps on CPU, and validation accuracy visibly rises:

  * arithmetic   - the correct sum/difference/product vs. a wrong one in the same format;
  * refusals     - a polite refusal of a clearly harmful ask vs. eager compliance that is
                   cut off or vague (never actionable: no real instructions are written);
  * instructions - an answer that follows a format instruction (one word, uppercase, a list
                   of three, yes/no, ...) vs. one that ignores it.

`prompt` is the plain instruction (the trainer wraps it in the Alpaca template). Responses
stay short (well under 40 tokens) so prompt + response fit in 128 tokens with the template.

Deterministic: a fixed seed and only the standard library, so rerunning the script
reproduces the committed file byte for byte:

    python3 deploy/data/make_default_prefs.py            # writes default_prefs.jsonl
    python3 deploy/data/make_default_prefs.py --check    # fails if the file is stale
"""

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20240611
OUT = Path(__file__).with_name("default_prefs.jsonl")

# How many pairs of each kind (600 in all).
N_ARITHMETIC = 250
N_REFUSAL = 150
N_INSTRUCTION = 200

# Conservative length limits in characters (SmolLM2's tokenizer averages ~4 characters per
# token on English and one token per digit); checked for every pair.
MAX_PROMPT_CHARS = 120
MAX_RESPONSE_CHARS = 150


# --------------------------------------------------------------------------- arithmetic

ADD_PROMPTS = [
    "What is {a} + {b}?",
    "Compute {a} + {b}.",
    "Add {a} and {b}.",
    "What is the sum of {a} and {b}?",
    "Calculate {a} plus {b}.",
    "Please work out {a} + {b}.",
]
SUB_PROMPTS = [
    "What is {a} - {b}?",
    "Compute {a} - {b}.",
    "Subtract {b} from {a}.",
    "What is {a} minus {b}?",
    "Calculate the difference {a} - {b}.",
]
MUL_PROMPTS = [
    "What is {a} x {b}?",
    "Compute {a} times {b}.",
    "Multiply {a} by {b}.",
    "What is the product of {a} and {b}?",
]
# The answer format; chosen and rejected share it so only the number differs.
ANSWER_FORMATS = [
    "{a} {op} {b} = {c}.",
    "{a} {op} {b} = {c}.",
    "The answer is {c}.",
    "{c}",
]


def wrong_answer(rng, right):
    """A plausible wrong result: off by a little, off by ten, or two digits swapped."""
    while True:
        kind = rng.choice(["small", "ten", "swap"])
        if kind == "small":
            c = right + rng.choice([-3, -2, -1, 1, 2, 3])
        elif kind == "ten":
            c = right + rng.choice([-10, 10])
        else:
            s = str(right)
            if len(s) < 2 or s[-1] == s[-2]:
                continue
            c = int(s[:-2] + s[-1] + s[-2])
        if c != right and c >= 0:
            return c


def arithmetic(rng):
    op = rng.choices(["+", "-", "x"], weights=[5, 3, 2])[0]
    if op == "+":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        c, templates = a + b, ADD_PROMPTS
    elif op == "-":
        a = rng.randint(20, 99)
        b = rng.randint(1, a - 1)
        c, templates = a - b, SUB_PROMPTS
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        c, templates = a * b, MUL_PROMPTS
    prompt = rng.choice(templates).format(a=a, b=b)
    fmt = rng.choice(ANSWER_FORMATS)
    chosen = fmt.format(a=a, b=b, op=op, c=c)
    rejected = fmt.format(a=a, b=b, op=op, c=wrong_answer(rng, c))
    return prompt, chosen, rejected


# --------------------------------------------------------------------------- refusals

# (the harmful ask, what the refusal declines, a safe alternative to offer, topic for the
# cut-off compliance). Kept clearly harmful and generic; no side contains real instructions.
HARMFUL = [
    ("pick the lock on my neighbour's front door while they are away",
     "getting into someone else's home", "If you are locked out of your own home, call a locksmith.",
     "pick your neighbour's lock"),
    ("steal a car without the keys", "stealing a car", "If you lost your own keys, your dealer can help.",
     "steal a car"),
    ("write a phishing email that tricks people into giving me their bank passwords",
     "phishing people", "I can explain how to spot phishing emails instead.", "write the phishing email"),
    ("break into my ex's email account", "getting into someone else's account",
     "If you are worried about your own account, I can help you secure it.", "get into the account"),
    ("make a fake passport", "forging identity documents",
     "Your government's passport office can help with a real one.", "make a fake passport"),
    ("poison my neighbour's dog", "harming an animal",
     "If the dog is a problem, talk to your neighbour or animal control.",
     "poison the dog"),
    ("shoplift from a supermarket without getting caught", "stealing",
     "If money for food is tight, local food banks can help.", "shoplift"),
    ("build a bomb", "making weapons or explosives",
     "If you are interested in chemistry, I can suggest safe experiments.", "build a bomb"),
    ("write ransomware that encrypts a company's files", "writing malware",
     "I can explain how companies protect themselves from ransomware.", "write ransomware"),
    ("print counterfeit money", "counterfeiting money",
     "I can tell you how banknote security features work.", "print counterfeit bills"),
    ("track my girlfriend's phone without her knowing", "secretly tracking someone",
     "If you have concerns, talking openly with her is a better step.",
     "track her phone secretly"),
    ("cheat on my final exam with a hidden earpiece", "cheating on exams",
     "I can help you make a study plan instead.", "set up the hidden earpiece"),
    ("hurt someone and make it look like an accident", "hurting people",
     "If you are in conflict with someone, I can suggest ways to get help.", "make it look like an accident"),
    ("make a drug at home to sell", "making illegal drugs",
     "I can share information about addiction support services.", "make the drug"),
    ("hack into my school's grading system", "breaking into computer systems",
     "If you think a grade is wrong, you can ask your teacher to review it.", "hack the grading system"),
    ("write a fake review campaign to ruin a rival shop", "deceiving customers",
     "I can help you improve your own shop's reviews honestly.", "write the fake reviews"),
    ("spread a rumour that will get my coworker fired", "harming someone's reputation",
     "If there is a real problem at work, HR can help.", "spread the rumour"),
    ("sneak a weapon through airport security", "getting weapons past security",
     "I can explain what you are allowed to pack.", "get it through security"),
    ("avoid paying taxes by hiding my income", "tax evasion",
     "A tax adviser can help you pay only what you owe, legally.", "hide your income"),
    ("start a fire in a building and not get caught", "arson",
     "If you are struggling with thoughts of harm, please reach out for help.",
     "start the fire"),
    ("scam elderly people out of their savings", "scamming people",
     "I can explain how to protect older relatives from scams.", "run the scam"),
    ("bully a classmate until they leave school", "bullying",
     "If you are having trouble with a classmate, a teacher can help.", "bully your classmate"),
    ("get into my roommate's locked diary", "invading someone's privacy",
     "If something is worrying you, talking to your roommate is a better step.", "open the diary"),
    ("steal my neighbour's Wi-Fi password", "accessing networks without permission",
     "I can help you find an affordable internet plan.", "get the password"),
]

ASK_PROMPTS = [
    "Tell me how to {ask}.",
    "How do I {ask}?",
    "Explain step by step how to {ask}.",
    "I want to {ask}. What should I do?",
    "Give me instructions to {ask}.",
    "What is the easiest way to {ask}?",
]
REFUSALS = [
    "I can't help with {what}. {alt}",
    "Sorry, I won't help with {what}. {alt}",
    "I won't help with {what}; it could hurt people. {alt}",
    "I can't assist with that. {alt}",
]
COMPLIANCE = [
    "Sure, here is how to {topic}: first, ...",
    "Of course! To {topic}, you just need to",
    "No problem. The best way to {topic} is to start by",
    "Great idea! Here are the steps to {topic}. Step 1:",
    "Sure, it is easy to {topic}. Just follow what others do and you will be fine.",
]


def refusal(rng):
    ask, what, alt, topic = rng.choice(HARMFUL)
    prompt = rng.choice(ASK_PROMPTS).format(ask=ask)
    chosen = rng.choice(REFUSALS).format(what=what, alt=alt)
    rejected = rng.choice(COMPLIANCE).format(topic=topic)
    return prompt, chosen, rejected


# --------------------------------------------------------------------------- instructions

ONE_WORD = [
    ("what colour is the sky on a clear day?", "Blue"),
    ("what is the capital of France?", "Paris"),
    ("what is the opposite of hot?", "Cold"),
    ("which animal barks?", "Dog"),
    ("what do bees make?", "Honey"),
    ("what colour is grass?", "Green"),
    ("what is frozen water called?", "Ice"),
    ("which planet do we live on?", "Earth"),
    ("what is the opposite of up?", "Down"),
    ("what season comes after winter?", "Spring"),
    ("what do cows drink?", "Water"),
    ("what is the capital of Italy?", "Rome"),
    ("what colour is a ripe banana?", "Yellow"),
    ("what do you call a baby cat?", "Kitten"),
    ("what gas do humans breathe in to live?", "Oxygen"),
    ("what is the largest ocean?", "Pacific"),
    ("what day comes after Monday?", "Tuesday"),
    ("what do you use to write on a blackboard?", "Chalk"),
]
ONE_WORD_PROMPTS = [
    "Answer in one word: {q}",
    "Use a single word to answer: {q}",
    "One word only, please: {q}",
]
RAMBLES = [
    "That is a great question, and there are many ways to think about it. People have "
    "wondered about it for ages. The answer is {a}.",
    "Well, it depends on how you look at it. Many people would say {a}, but there is a lot "
    "more to say, and I could go on.",
    "Let me start with some background, since it is an interesting topic with a long history "
    "behind it, before we get to the actual answer.",
]

UPPERCASE = [
    "say good morning to the team",
    "tell me the name of the first month of the year",
    "say that the meeting is at noon",
    "wish me a happy birthday",
    "say that dinner is ready",
    "tell me the colour of snow",
    "say thank you for the help",
    "tell me that the shop is closed",
    "say that it is going to rain today",
    "name the star at the centre of our solar system",
]
UPPERCASE_ANSWERS = {
    "say good morning to the team": "Good morning, team!",
    "tell me the name of the first month of the year": "The first month is January.",
    "say that the meeting is at noon": "The meeting is at noon.",
    "wish me a happy birthday": "Happy birthday to you!",
    "say that dinner is ready": "Dinner is ready!",
    "tell me the colour of snow": "Snow is white.",
    "say thank you for the help": "Thank you for the help!",
    "tell me that the shop is closed": "The shop is closed.",
    "say that it is going to rain today": "It is going to rain today.",
    "name the star at the centre of our solar system": "The Sun.",
}
UPPERCASE_PROMPTS = [
    "Reply in uppercase: {t}.",
    "Answer using only capital letters: {t}.",
    "Write your whole reply in UPPERCASE: {t}.",
]

LISTS = [
    ("fruits", ["Apple", "Banana", "Cherry", "Mango", "Pear", "Orange", "Grape", "Peach"]),
    ("colours", ["Red", "Blue", "Green", "Yellow", "Purple", "Orange", "Pink"]),
    ("animals", ["Dog", "Cat", "Horse", "Lion", "Rabbit", "Elephant", "Owl"]),
    ("vegetables", ["Carrot", "Potato", "Onion", "Broccoli", "Spinach", "Pea"]),
    ("countries", ["France", "Japan", "Brazil", "Canada", "Kenya", "India"]),
    ("musical instruments", ["Piano", "Guitar", "Violin", "Drum", "Flute", "Trumpet"]),
    ("sports", ["Football", "Tennis", "Swimming", "Basketball", "Cricket", "Golf"]),
    ("things you find in a kitchen", ["Spoon", "Pan", "Kettle", "Knife", "Plate", "Oven"]),
]
LIST_PROMPTS = [
    "List three {k}.",
    "Name three {k}.",
    "Give me a list of three {k}.",
    "Write down three {k}, one per line.",
]
OFF_TOPIC = [
    "I like to go for long walks in the park when the weather is nice.",
    "The weather today is quite pleasant, with a light breeze.",
    "Lists can be very useful for organising your thoughts.",
    "There are so many things in the world, it is hard to choose.",
    "My favourite number is seven, because it feels lucky.",
]

YES_NO = [
    ("is ice cold?", "Yes."),
    ("is the sun a star?", "Yes."),
    ("can fish breathe underwater?", "Yes."),
    ("is fire cold?", "No."),
    ("do cats have wings?", "No."),
    ("is a week seven days long?", "Yes."),
    ("is the moon made of cheese?", "No."),
    ("is water wet?", "Yes."),
    ("can people breathe in space without a suit?", "No."),
    ("is ten larger than three?", "Yes."),
    ("is a tomato a kind of animal?", "No."),
]
YES_NO_PROMPTS = [
    "Answer yes or no: {q}",
    "Reply with only yes or no: {q}",
]
HEDGES = [
    "That is an interesting question with many sides to it, and different people see it differently.",
    "It depends on a lot of things, so it is hard to give a simple answer here.",
    "Let me think about this from several angles before deciding anything.",
]

COUNT_PROMPTS = [
    "Count from 1 to {n}.",
    "Write the numbers from 1 to {n}, separated by commas.",
]

REPEAT_WORDS = ["hello", "cat", "blue", "yes", "moon", "tree", "happy", "rain"]
REPEAT_PROMPTS = [
    "Repeat the word '{w}' three times.",
    "Write '{w}' three times, separated by spaces.",
]


def instruction(rng):
    kind = rng.choice(["one_word", "uppercase", "list", "yes_no", "count", "repeat"])
    if kind == "one_word":
        q, a = rng.choice(ONE_WORD)
        prompt = rng.choice(ONE_WORD_PROMPTS).format(q=q)
        return prompt, a + ".", rng.choice(RAMBLES).format(a=a.lower())
    if kind == "uppercase":
        t = rng.choice(UPPERCASE)
        prompt = rng.choice(UPPERCASE_PROMPTS).format(t=t)
        answer = UPPERCASE_ANSWERS[t]
        return prompt, answer.upper(), answer
    if kind == "list":
        k, items = rng.choice(LISTS)
        prompt = rng.choice(LIST_PROMPTS).format(k=k)
        three = rng.sample(items, 3)
        chosen = "\n".join(f"{i}. {x}" for i, x in enumerate(three, 1))
        if rng.random() < 0.5:
            rejected = rng.choice(OFF_TOPIC)
        else:
            # Ignores the count: one item and a digression.
            rejected = f"{three[0]} is one. {rng.choice(OFF_TOPIC)}"
        return prompt, chosen, rejected
    if kind == "yes_no":
        q, a = rng.choice(YES_NO)
        prompt = rng.choice(YES_NO_PROMPTS).format(q=q)
        return prompt, a, rng.choice(HEDGES)
    if kind == "count":
        n = rng.randint(4, 9)
        prompt = rng.choice(COUNT_PROMPTS).format(n=n)
        chosen = ", ".join(str(i) for i in range(1, n + 1))
        skipped = sorted(rng.sample(range(2, n + 1), 2))
        wrong = [i for i in range(1, n + 1) if i not in skipped]
        rejected = ", ".join(str(i) for i in wrong)
        return prompt, chosen, rejected
    w = rng.choice(REPEAT_WORDS)
    prompt = rng.choice(REPEAT_PROMPTS).format(w=w)
    return prompt, " ".join([w] * 3), w


# --------------------------------------------------------------------------- assembly

def unique_pairs(rng, make, n):
    """n pairs from `make`, no (prompt, chosen, rejected) repeated. Prompts may repeat (a
    harmful ask refused in different words), but the whole pair never does."""
    seen, out = set(), []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n:
            sys.exit(f"could not make {n} distinct pairs with {make.__name__}")
        pair = make(rng)
        if pair in seen:
            continue
        seen.add(pair)
        out.append(pair)
    return out


def build():
    rng = random.Random(SEED)
    pairs = (
        [("arithmetic",) + p for p in unique_pairs(rng, arithmetic, N_ARITHMETIC)]
        + [("refusal",) + p for p in unique_pairs(rng, refusal, N_REFUSAL)]
        + [("instruction",) + p for p in unique_pairs(rng, instruction, N_INSTRUCTION)]
    )
    rng.shuffle(pairs)
    lines = []
    for _kind, prompt, chosen, rejected in pairs:
        assert chosen != rejected, (prompt, chosen)
        assert len(prompt) <= MAX_PROMPT_CHARS, prompt
        assert len(chosen) <= MAX_RESPONSE_CHARS, chosen
        assert len(rejected) <= MAX_RESPONSE_CHARS, rejected
        record = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        lines.append(json.dumps(record, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"output file (default: {OUT.name})")
    ap.add_argument("--check", action="store_true", help="fail if --out differs from a fresh build")
    args = ap.parse_args()
    text = build()
    if args.check:
        if not args.out.exists() or args.out.read_text(encoding="utf-8") != text:
            sys.exit(f"{args.out} is stale: rerun {Path(__file__).name}")
        print(f"{args.out}: up to date ({text.count(chr(10))} pairs)")
        return
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} pairs to {args.out}")


if __name__ == "__main__":
    main()
