"""Synthetic consultations: the offline default dataset, in the raw RealMedConv format.

A patient describes a complaint; the pharmacist needs three facts about it before suggesting a medication, and
which three depends on the condition (``Condition.needs``: for a sprained ankle where it hurts, how badly and how
it happened; for a migraine what the pain feels like, how bad it is and what else comes with it). The patient
sometimes states some of them in the opening. The pharmacist then asks about the missing ones, one question per
turn, often offering answer choices; the patient states each fact; and once all three are known the pharmacist
closes with advice and/or ``<med_search>``. So stopping is a consequence of the dialogue: whether a sample is a
"stop" follows from its condition and the facts already stated (``pharmacist_stops``).

Ground truth rides along as extra keys of the raw messages: every question carries ``"elicits": ["<field>:
<value>"]``, which ``l2a.data.oracle_facts`` reads, so ``info_truth`` is exact and the whole pipeline runs
without an LLM; every patient message that states a fact carries ``"states": [...]``, so the stop rule can be
checked and ``decision_baselines`` can say how well simpler rules would do. Questions use plain cue words per
field ("feel like", "where", "how severe", "bring on", "other symptoms") so that the offline rubric judge can
match them to info_truth items.

    python -m l2a.data synth --out data/synthetic     # 600 sessions, 37 conditions, seed 0
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Condition:
    """A condition, the values a patient may report, and the facts the pharmacist needs before advising.

    Value phrases are spoken by both doctor and patient, so they avoid "my"/"your"."""

    diagn: str
    complaint: str             # the doctor's word for it: "How severe is the {complaint}?"
    openings: tuple[str, ...]  # the patient's first words, completed by a duration ("for two days")
    nature: tuple[str, ...]    # fits "It's {}." and "I'd describe it as {}."
    location: tuple[str, ...]  # fits "I feel it in {}."; empty when the complaint already names the place
    trigger: tuple[str, ...]   # fits "I think it's {}." and "It seems to come from {}."
    others: tuple[str, ...]    # associated symptoms, fits "Yes, I also have {}."
    advice: str
    needs: tuple[str, ...]     # the three FIELDS that must be known before the advice


CONDITIONS = (
    Condition("Tension headache", "headache", ("I've had a headache", "my head has been aching"),
              ("dull and pressing", "tight, like a band", "a steady ache"),
              ("the forehead", "both temples", "the back of the head"),
              ("stress at work", "long hours at the screen", "lack of sleep"),
              ("tight neck muscles", "tiredness", "trouble concentrating"),
              "Rest, take regular breaks from the screen, and paracetamol or ibuprofen can ease the pain.",
              needs=("symptom severity", "symptom location", "symptom trigger")),
    Condition("Migraine", "headache", ("I've had a really bad headache", "my head has been hurting a lot"),
              ("throbbing", "pulsating", "pounding"),
              ("the left side of the head", "the right side of the head", "the area behind one eye"),
              ("bright light", "skipping meals", "red wine"),
              ("nausea", "sensitivity to light", "flashing spots in the vision"),
              "Rest in a dark, quiet room; ibuprofen or a migraine tablet taken early works best.",
              needs=("symptom nature", "symptom severity", "symptom")),
    Condition("Gastroenteritis", "diarrhea", ("I've had diarrhea", "my stomach has been upset"),
              ("watery", "loose and frequent", "mixed with mucus"),
              (),
              ("street food", "a takeaway meal", "undercooked chicken"),
              ("vomiting", "stomach cramps", "a mild fever"),
              "Drink plenty of fluids with oral rehydration salts and eat light food for a few days.",
              needs=("symptom nature", "symptom severity", "symptom")),
    Condition("Acid reflux", "heartburn", ("I've had heartburn", "I've been getting heartburn"),
              ("burning", "sour and burning", "a rising warmth"),
              ("the chest behind the breastbone", "the upper belly", "the throat"),
              ("lying down after meals", "spicy food", "coffee"),
              ("a sour taste in the mouth", "burping", "a hoarse voice in the morning"),
              "An antacid or a short course of omeprazole can help; avoid late, large or spicy meals.",
              needs=("symptom location", "symptom trigger", "symptom")),
    Condition("Common cold", "runny nose", ("I've had a runny nose", "my nose has been running"),
              ("clear and watery", "thick and white", "yellowish"),
              (),
              ("getting caught in the rain", "a colleague who had a cold", "cold weather"),
              ("sneezing", "a sore throat", "a mild cough"),
              "Rest, drink warm fluids, and a saline nasal spray or paracetamol can ease the symptoms.",
              needs=("symptom nature", "symptom", "symptom severity")),
    Condition("Allergic rhinitis", "sneezing", ("I've been sneezing a lot", "I haven't been able to stop sneezing"),
              ("in sudden bouts", "constant", "on and off"),
              (),
              ("pollen", "dust", "cat hair"),
              ("itchy eyes", "a blocked nose", "an itchy throat"),
              "A non-drowsy antihistamine such as loratadine and a steroid nasal spray usually help.",
              needs=("symptom trigger", "symptom", "symptom nature")),
    Condition("Conjunctivitis", "eye redness", ("my eyes have been red", "I've had red, irritated eyes"),
              ("itchy", "gritty", "burning"),
              ("the left eye", "the right eye", "both eyes"),
              ("a classmate with pink eye", "wearing contact lenses", "rubbing the eyes"),
              ("sticky discharge", "watery eyes", "crusty eyelids in the morning"),
              "Clean the eyes with cooled boiled water, don't share towels, and use antibiotic drops if "
              "the discharge is thick.",
              needs=("symptom nature", "symptom location", "symptom")),
    Condition("Contact dermatitis", "rash", ("I've had a rash", "my skin has been breaking out"),
              ("itchy and red", "dry and scaly", "blistering"),
              ("the hands", "the wrists", "the neck"),
              ("a new laundry detergent", "a new hand cream", "a metal watch strap"),
              ("a burning feeling on the skin", "small blisters", "cracked skin"),
              "Avoid the trigger, use a fragrance-free moisturiser, and a mild hydrocortisone cream helps.",
              needs=("symptom trigger", "symptom location", "symptom nature")),
    Condition("Sprained ankle", "ankle pain", ("I've had ankle pain", "my ankle has been hurting"),
              ("sharp", "aching", "throbbing"),
              ("the outer side of the ankle", "the inner side of the ankle", "the front of the ankle"),
              ("walking", "climbing stairs", "standing for a long time"),
              ("swelling", "bruising", "stiffness"),
              "Rest, ice, compression and elevation help; ibuprofen gel or tablets can ease the pain.",
              needs=("symptom location", "symptom severity", "symptom trigger")),
    Condition("Lower back strain", "back pain", ("I've had back pain", "my back has been hurting"),
              ("dull and aching", "sharp", "stiff"),
              ("the lower back", "the left side of the lower back", "the right side of the lower back"),
              ("bending forward", "lifting heavy boxes", "sitting for a long time"),
              ("muscle spasms", "stiffness in the morning", "pain spreading to the buttock"),
              "Keep gently active, use a heat pack, and ibuprofen or paracetamol can help for a few days.",
              needs=("symptom location", "symptom severity", "symptom trigger")),
    Condition("Urinary tract infection", "pain when urinating",
              ("it's been burning when I pee", "I've had pain when urinating"),
              ("burning", "stinging", "sharp"),
              (),
              ("not drinking enough water", "holding in urine for a long time"),
              ("needing to pee often", "cloudy urine", "lower belly pain"),
              "Drink plenty of water and please see a doctor for a urine test, as antibiotics are usually needed.",
              needs=("symptom", "symptom severity", "symptom nature")),
    Condition("Pharyngitis", "sore throat", ("I've had a sore throat", "my throat has been hurting"),
              ("scratchy", "raw and burning", "dry and tight"),
              (),
              ("swallowing", "talking a lot", "cold drinks"),
              ("a mild fever", "swollen glands in the neck", "a dry cough"),
              "Warm salt-water gargles, throat lozenges and paracetamol can help.",
              needs=("symptom severity", "symptom", "symptom trigger")),
    Condition("Acute bronchitis", "cough", ("I've had a cough", "I've been coughing"),
              ("dry", "wet with yellow phlegm", "hacking"),
              (),
              ("cold air", "lying down at night", "talking"),
              ("chest tightness", "wheezing", "tiredness"),
              "Rest and drink warm fluids; honey or a cough syrup can soothe it, and see a doctor if you "
              "get short of breath.",
              needs=("symptom nature", "symptom", "symptom trigger")),
    Condition("Constipation", "constipation",
              ("I've been constipated", "I haven't been able to go to the toilet properly"),
              ("hard and dry", "lumpy and painful to pass", "small and pellet-like"),
              (),
              ("a low-fibre diet", "not drinking enough water", "travelling"),
              ("bloating", "stomach cramps", "loss of appetite"),
              "Eat more fibre and drink more water; a gentle laxative such as macrogol can help.",
              needs=("symptom nature", "symptom trigger", "symptom")),
    Condition("Indigestion", "stomach pain", ("I've had stomach pain", "my stomach has been hurting"),
              ("burning", "gnawing", "crampy"),
              ("the upper belly", "the area just below the ribs", "the middle of the belly"),
              ("large meals", "fatty food", "alcohol"),
              ("bloating", "nausea", "burping"),
              "Eat smaller meals, cut down on fatty food and alcohol, and an antacid can ease the discomfort.",
              needs=("symptom location", "symptom trigger", "symptom nature")),
    Condition("Hemorrhoids", "pain when passing stool",
              ("it's been painful to pass stool", "I've had pain in my bottom"),
              ("sharp", "itchy", "burning"),
              (),
              ("straining on the toilet", "sitting for a long time", "constipation"),
              ("bright red blood on the toilet paper", "a small lump near the anus",
               "a feeling of incomplete emptying"),
              "Keep stools soft with fibre and water; a haemorrhoid cream or suppository can ease the pain.",
              needs=("symptom", "symptom nature", "symptom severity")),
    Condition("Sinusitis", "facial pain", ("I've had pain in my face", "my face has been aching"),
              ("pressure-like", "dull and heavy", "throbbing"),
              ("the forehead", "the cheeks", "the area around the eyes"),
              ("bending forward", "lying down", "cold air"),
              ("a blocked nose", "thick yellow mucus", "a reduced sense of smell"),
              "Saline nasal rinses, steam and a decongestant spray for a few days can help.",
              needs=("symptom location", "symptom", "symptom nature")),
    Condition("Dental pain", "toothache", ("I've had a toothache", "my tooth has been hurting"),
              ("throbbing", "sharp", "dull"),
              ("the upper left teeth", "the lower right teeth", "the front teeth"),
              ("cold drinks", "sweet food", "chewing"),
              ("swollen gums", "a bad taste in the mouth", "jaw pain"),
              "Ibuprofen or paracetamol can ease the pain for now, but please see a dentist soon.",
              needs=("symptom location", "symptom trigger", "symptom severity")),
    Condition("Mouth ulcer", "mouth ulcer", ("I've had a mouth ulcer", "I've had a painful sore in my mouth"),
              ("stinging", "burning", "sore"),
              ("the inside of the cheek", "the tongue", "the lower lip"),
              ("spicy food", "acidic fruit", "brushing the teeth"),
              ("pain when eating", "a tender lump under the jaw", "tiredness"),
              "A numbing mouth gel or an antiseptic mouthwash helps; avoid spicy and acidic food for now.",
              needs=("symptom location", "symptom severity", "symptom trigger")),
    Condition("Eczema", "itchy skin", ("I've had itchy skin", "my skin has been very itchy"),
              ("dry and flaky", "red and itchy", "rough and thickened"),
              ("the inner elbows", "the backs of the knees", "the face"),
              ("hot showers", "wool clothes", "dry winter air"),
              ("cracked skin", "trouble sleeping because of the itch", "small bumps"),
              "Use a thick emollient several times a day, keep showers lukewarm, and a mild steroid cream "
              "helps flare-ups.",
              needs=("symptom location", "symptom trigger", "symptom nature")),
    Condition("Urticaria", "rash", ("I've had an itchy rash with raised bumps", "I've been breaking out in hives"),
              ("itchy", "raised and red", "burning"),
              ("the arms", "the chest", "the whole body"),
              ("seafood", "a new medicine", "heat"),
              ("a flushed face", "warm skin", "tiredness"),
              "A non-drowsy antihistamine such as cetirizine usually helps; seek urgent care if your lips or "
              "throat swell.",
              needs=("symptom trigger", "symptom", "symptom location")),
    Condition("Athlete's foot", "itching", ("my feet have been itching", "I've had itchy feet"),
              ("itchy and peeling", "burning", "cracked and sore"),
              ("the skin between the toes", "the soles of the feet", "the sides of the feet"),
              ("wearing sports shoes all day", "sweaty socks", "public showers"),
              ("a bad smell", "small blisters", "white, soggy skin"),
              "Use an antifungal cream such as terbinafine, keep the feet dry and change socks daily.",
              needs=("symptom location", "symptom nature", "symptom trigger")),
    Condition("Neck strain", "neck pain", ("I've had neck pain", "my neck has been hurting"),
              ("stiff", "aching", "sharp"),
              ("the left side of the neck", "the right side of the neck", "the back of the neck"),
              ("turning the head", "sleeping on a new pillow", "looking down at a phone"),
              ("a headache", "tight shoulders", "tingling in the arm"),
              "Keep moving gently, use a warm compress, and ibuprofen gel or tablets can ease the stiffness.",
              needs=("symptom location", "symptom trigger", "symptom")),
    Condition("Menstrual cramps", "period pain", ("I've had bad period pain", "my period cramps have been painful"),
              ("crampy", "dull and aching", "stabbing"),
              ("the lower belly", "the lower back", "the upper thighs"),
              ("the first day of the period", "standing for a long time", "cold drinks"),
              ("nausea", "bloating", "tiredness"),
              "Ibuprofen or naproxen started early works best, and a heat pad on the belly also helps.",
              needs=("symptom severity", "symptom nature", "symptom")),
    Condition("Motion sickness", "nausea", ("I've been feeling sick to my stomach", "I've had nausea"),
              ("queasy", "light-headed and queasy", "a constant urge to vomit"),
              (),
              ("car rides", "boat trips", "reading in the car"),
              ("cold sweats", "dizziness", "a headache"),
              "Take a motion sickness tablet such as dimenhydrinate before travelling, and look at the horizon.",
              needs=("symptom trigger", "symptom severity", "symptom")),
    Condition("Swimmer's ear", "earache", ("I've had an earache", "I've had ear pain"),
              ("sharp", "itchy", "dull and throbbing"),
              ("the left ear", "the right ear", "both ears"),
              ("swimming", "using cotton buds", "wearing earphones"),
              ("discharge from the ear", "muffled hearing", "pain when touching the ear"),
              "Keep the ear dry and avoid cotton buds; pharmacy ear drops for swimmer's ear can help.",
              needs=("symptom trigger", "symptom", "symptom location")),
    Condition("Influenza", "fever", ("I've had a fever", "I've been running a temperature"),
              ("high with chills", "coming and going", "constant"),
              (),
              ("a flu outbreak at work", "a family member with flu", "a crowded flight"),
              ("body aches", "a dry cough", "a headache"),
              "Rest, drink plenty of fluids and take paracetamol for the fever; see a doctor if you struggle "
              "to breathe.",
              needs=("symptom nature", "symptom", "symptom severity")),
    Condition("Plantar fasciitis", "heel pain", ("I've had heel pain", "my heel has been hurting"),
              ("sharp", "stabbing", "aching"),
              ("the bottom of the heel", "the arch of the foot", "the back of the heel"),
              ("the first steps in the morning", "running", "standing for a long time"),
              ("stiffness in the foot", "swelling", "a burning feeling"),
              "Stretch the calf and foot, wear supportive shoes, and ibuprofen or an ice pack eases the pain.",
              needs=("symptom location", "symptom trigger", "symptom severity")),
    Condition("Tennis elbow", "elbow pain", ("I've had elbow pain", "my elbow has been hurting"),
              ("burning", "aching", "sharp"),
              ("the outer side of the elbow", "the inner side of the elbow", "the forearm"),
              ("gripping things", "lifting a kettle", "typing"),
              ("a weak grip", "stiffness", "pain down the forearm"),
              "Rest the arm from gripping tasks, use an elbow strap, and ibuprofen gel can help.",
              needs=("symptom location", "symptom trigger", "symptom nature")),
    Condition("Carpal tunnel syndrome", "hand numbness",
              ("my hand has been going numb", "I've had numbness in my hand"),
              ("tingling", "numb", "burning"),
              ("the thumb and index finger", "the middle finger", "the whole hand"),
              ("typing", "holding a phone", "driving"),
              ("a weak grip", "dropping things", "pain in the wrist"),
              "A wrist splint at night and regular breaks help; see a doctor if the numbness persists.",
              needs=("symptom location", "symptom nature", "symptom trigger")),
    Condition("Dry eye", "eye dryness", ("my eyes have been dry", "I've had dry, tired eyes"),
              ("gritty", "burning", "tired and scratchy"),
              (),
              ("long screen time", "air conditioning", "wind"),
              ("blurred vision", "red eyes", "watery eyes"),
              "Lubricating eye drops several times a day and regular screen breaks usually help.",
              needs=("symptom trigger", "symptom nature", "symptom")),
    Condition("Sunburn", "sunburn", ("I've had a sunburn", "my skin has been red and sore from the sun"),
              ("hot and stinging", "tender", "itchy"),
              ("the shoulders", "the face", "the back"),
              ("a day at the beach", "gardening in the sun", "a long hike"),
              ("peeling skin", "small blisters", "a headache"),
              "Cool the skin, apply aloe vera or a soothing lotion, drink water, and stay out of the sun.",
              needs=("symptom severity", "symptom location", "symptom")),
    Condition("Cold sore", "cold sore", ("I've had a cold sore", "I've had a sore on my lip"),
              ("tingling", "burning", "itchy"),
              ("the upper lip", "the lower lip", "the corner of the mouth"),
              ("stress", "a cold", "strong sun"),
              ("small blisters", "crusting", "swollen glands"),
              "An antiviral cream such as aciclovir works best when started early; don't pick the sore.",
              needs=("symptom nature", "symptom location", "symptom trigger")),
    Condition("Irritable bowel syndrome", "stomach pain", ("I've had stomach pain", "my belly has been cramping"),
              ("crampy", "sharp", "dull"),
              ("the lower belly", "the left side of the belly", "the area around the navel"),
              ("stress", "dairy products", "large meals"),
              ("bloating", "alternating diarrhea and constipation", "gas"),
              "Regular meals, less fatty food and an antispasmodic such as mebeverine can help.",
              needs=("symptom trigger", "symptom", "symptom location")),
    Condition("Dandruff", "scalp itching", ("my scalp has been itchy", "I've had an itchy scalp"),
              ("itchy and flaky", "oily and scaly", "dry and tight"),
              (),
              ("cold weather", "a new shampoo", "stress"),
              ("white flakes on clothes", "red patches", "hair loss"),
              "An anti-dandruff shampoo with ketoconazole or zinc pyrithione, twice a week, usually clears it.",
              needs=("symptom nature", "symptom trigger", "symptom")),
    Condition("Leg cramps", "cramp", ("I've had leg cramps", "my legs have been cramping at night"),
              ("sudden and tight", "sharp", "knotted"),
              ("the calf", "the thigh", "the foot"),
              ("exercise", "lying in bed", "hot weather"),
              ("muscle soreness", "tiredness", "tingling"),
              "Stretch the calf before bed, drink enough water, and gently massage the muscle during a cramp.",
              needs=("symptom location", "symptom trigger", "symptom severity")),
    Condition("Positional vertigo", "dizziness", ("I've been dizzy", "I've had dizziness"),
              ("spinning", "light-headed", "unsteady"),
              (),
              ("turning over in bed", "looking up", "standing up quickly"),
              ("nausea", "ringing in the ears", "a headache"),
              "Move slowly when you change position, and see a doctor if the dizziness keeps coming back.",
              needs=("symptom trigger", "symptom nature", "symptom")),
)

SEVERITIES = ("mild", "moderate", "severe")
FIELDS = ("symptom", "symptom nature", "symptom location", "symptom severity", "symptom trigger")
CONDITION_BY_NAME = {condition.diagn: condition for condition in CONDITIONS}
VOLUNTEERED_COUNT_WEIGHTS = (0.6, 0.25, 0.15)
"""How often the patient's opening states 0, 1 or 2 of the three needed facts."""

# Doctor questions: {c} = the complaint, {choices} = "a, b or c".
QUESTIONS_WITH_CHOICES = {
    "symptom": ("Do you have any other symptoms, such as {choices}?",
                "Apart from the {c}, have you noticed any other symptoms, like {choices}?",
                "Any other symptoms besides the {c}, for example {choices}?"),
    "symptom nature": ("What does the {c} feel like: {choices}?",
                       "What kind of {c} is it, {choices}?",
                       "How would you describe the {c}: {choices}?"),
    "symptom location": ("Where exactly is the {c}: {choices}?",
                         "Where do you feel the {c} most, {choices}?"),
    "symptom severity": ("How severe is the {c}: {choices}?",
                         "How bad is the {c}, would you say {choices}?",
                         "On a scale from mild to severe, how bad is the {c}: {choices}?"),
    "symptom trigger": ("What brings on the {c}: {choices}?",
                        "Does anything make the {c} worse, like {choices}?",
                        "Did you notice what triggers the {c}, {choices}?"),
}
OPEN_QUESTIONS = {
    "symptom": ("Do you have any other symptoms?", "Have you noticed any other symptoms apart from the {c}?"),
    "symptom nature": ("What does the {c} feel like?", "What kind of {c} is it?"),
    "symptom location": ("Where exactly do you feel the {c}?", "Where is the {c}?"),
    "symptom severity": ("How severe is the {c}?", "On a scale from mild to severe, how bad is the {c}?"),
    "symptom trigger": ("What brings on the {c} or makes it worse?", "Does anything trigger the {c}?"),
}
ANSWERS = {  # {v} = the value
    "symptom": ("Yes, I also have {v}.", "Now that you mention it, {v} too.", "Yes, {v}."),
    "symptom nature": ("It's {v}.", "Mostly {v}, I think.", "I'd describe it as {v}."),
    "symptom location": ("Mostly {v}.", "It's around {v}.", "I feel it in {v}."),
    "symptom severity": ("I'd say {v}.", "{v}, I think.", "It's {v}.", "Probably {v}."),
    "symptom trigger": ("I think it's {v}.", "It seems to come from {v}.", "Probably {v}."),
}
VOLUNTEERED = {  # facts a patient may state unasked in the opening
    "symptom": "I also have {v}.",
    "symptom nature": "It's {v}.",
    "symptom location": "I feel it in {v}.",
    "symptom severity": "It's {v}, I'd say.",
    "symptom trigger": "I think {v} brought it on.",
}
DURATIONS = ("since yesterday", "for two days", "for three days", "for about a week", "since this morning")
GREETINGS = ("Hello, many people are consulting right now, please wait patiently.",
             "Hi, I'm the pharmacist on duty. How can I help?",
             "Hello, thanks for waiting. What seems to be the problem?")
PATIENT_ASKS = ("What medicine can I take?", "What should I do?", "Can you recommend something?")
DOCTOR_FILLERS = ("Okay.", "I see.", "Thanks for explaining.", "Got it.")
PATIENT_FILLERS = ("Please be quick, I'm at work.", "Is it serious?", "I hope it's nothing bad.")
CLOSING_LEADS = ("Thank you, I have enough information now.", "Okay, thanks for the details.")
CLOSING_SAFETY = ("If it gets worse or lasts more than a few days, please see a doctor in person.",
                  "Please see a doctor if it doesn't improve.")


def _values(condition: Condition, field: str) -> tuple[str, ...]:
    return {"symptom": condition.others, "symptom nature": condition.nature,
            "symptom location": condition.location, "symptom severity": SEVERITIES,
            "symptom trigger": condition.trigger}[field]


def _fact(field: str, value: str) -> str:
    """The fact for a field and value, e.g. "symptom location: forehead" (facts carry no article)."""
    return f"{field}: {re.sub(r'^(the|a|an) ', '', value)}"


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _either(options: list[str]) -> str:
    """Join answer choices as "a, b or c"."""
    return options[0] if len(options) == 1 else ", ".join(options[:-1]) + " or " + options[-1]


def _question(rng: random.Random, condition: Condition, field: str, value: str) -> str:
    """A doctor question about ``field``, usually offering answer choices that include the true ``value``."""
    if rng.random() < 0.2:
        return rng.choice(OPEN_QUESTIONS[field]).format(c=condition.complaint)
    if field == "symptom severity":
        choices = list(SEVERITIES)
    else:
        decoys = [v for v in _values(condition, field) if v != value]
        choices = [value] + rng.sample(decoys, rng.randint(1, len(decoys)) if decoys else 0)
        rng.shuffle(choices)
    return rng.choice(QUESTIONS_WITH_CHOICES[field]).format(c=condition.complaint, choices=_either(choices))


def _opening(rng: random.Random, condition: Condition, volunteered: list[tuple[str, str]]) -> list[dict]:
    """The patient's first messages: the complaint, maybe some (field, value) facts unasked, maybe a request."""
    complaint = f"{rng.choice(condition.openings)} {rng.choice(DURATIONS)}."
    facts = [(_capitalize(VOLUNTEERED[field].format(v=value)), _fact(field, value)) for field, value in volunteered]
    ask = rng.choice(PATIENT_ASKS)
    style = rng.randrange(3)
    if style == 0:  # everything in one message
        greeting = rng.choice(("Hello, ", "Hi doctor, ", ""))
        text = " ".join([greeting + complaint if greeting else _capitalize(complaint), *(t for t, _ in facts), ask])
        return [_patient(text, [fact for _, fact in facts])]
    if style == 1:  # chat style: one short message after another
        return [_patient("Hello"), _patient(_capitalize(complaint)), *(_patient(t, [f]) for t, f in facts),
                _patient(ask)]
    text = _capitalize(complaint) + "".join(" " + t for t, _ in facts)
    return [_patient(text, [fact for _, fact in facts]), _patient(ask)]


def _patient(text: str, states: list[str] | None = None) -> dict:
    """A patient message; ``states`` lists the facts it tells (ground truth for the stop rule)."""
    return {"role": "user", "content": text, **({"states": states} if states else {})}


def synthesize_session(rng: random.Random, session_id: int) -> dict:
    """One synthetic consultation in the raw RealMedConv format, with ``elicits`` on every question and
    ``states`` on every patient message that tells a fact.

    The pharmacist asks about each needed fact the patient has not volunteered, then closes: the number of
    questions is 3 minus the number volunteered (``VOLUNTEERED_COUNT_WEIGHTS``).
    """
    condition = rng.choice(CONDITIONS)
    needed = list(condition.needs)
    rng.shuffle(needed)
    value = {field: rng.choice(_values(condition, field)) for field in needed}
    n_volunteered = rng.choices(range(len(VOLUNTEERED_COUNT_WEIGHTS)), weights=VOLUNTEERED_COUNT_WEIGHTS)[0]
    volunteered, asked = needed[:n_volunteered], needed[n_volunteered:]

    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "assistant", "content": rng.choice(GREETINGS)})
    messages += _opening(rng, condition, [(field, value[field]) for field in volunteered])
    for field in asked:
        fact = _fact(field, value[field])
        if rng.random() < 0.15:
            messages.append({"role": "assistant", "content": rng.choice(DOCTOR_FILLERS)})
        messages.append({"role": "assistant", "content": _question(rng, condition, field, value[field]),
                         "elicits": [fact]})
        messages.append(_patient(_capitalize(rng.choice(ANSWERS[field]).format(v=value[field])), [fact]))
        if rng.random() < 0.15:
            messages.append(_patient(rng.choice(PATIENT_FILLERS)))
    advice = f"{rng.choice(CLOSING_LEADS)} {condition.advice} {rng.choice(CLOSING_SAFETY)}"
    for text in rng.choice((["<med_search>"], [advice], [advice, "<med_search>"])):
        messages.append({"role": "assistant", "content": text})
    return {"session_id": session_id, "diagn": condition.diagn, "messages": messages}


def synthesize_sessions(n_sessions: int = 600, seed: int = 0) -> list[dict]:
    """``n_sessions`` synthetic consultations, session ids 1..n; the same seed gives the same sessions."""
    rng = random.Random(seed)
    return [synthesize_session(rng, session_id) for session_id in range(1, n_sessions + 1)]


# ---------------------------------------------------------------------------------------------------------------
# The stop rule, and how well simpler rules predict it


def known_fields(messages: list[dict]) -> frozenset[str]:
    """The fields the patient has stated so far (read from the ``states`` ground truth)."""
    return frozenset(fact.split(": ", 1)[0] for m in messages for fact in m.get("states", []))


def pharmacist_stops(diagn: str, messages: list[dict]) -> bool:
    """The rule that generated the data: stop once every fact the condition needs is known."""
    return set(CONDITION_BY_NAME[diagn].needs) <= known_fields(messages)


def _answers_so_far(sample: dict) -> int:
    return sum("elicits" in m for m in sample["messages"])


def _known_so_far(sample: dict) -> tuple[str, frozenset[str]]:
    return sample["diagn"], known_fields(sample["messages"])


def decision_baselines(train: list[dict], test: list[dict]) -> dict[str, float]:
    """Decision accuracy on ``test`` of simple rules: how much of stopping a policy can learn from the dialogue.

    ``train`` and ``test`` are split samples whose messages keep the raw ground truth (``l2a.data.split_session``).
    A majority vote maps each value of a feature to the decision most frequent for it in ``train`` (unseen
    values: the overall majority) and is scored on ``test``:

    - ``always_continue``: the share of continue samples, what a policy that never stops gets;
    - ``majority_by_answers``: by the number of questions answered so far;
    - ``majority_by_condition_and_known``: by the condition and the set of fields already stated;
    - ``rule``: ``pharmacist_stops`` itself, the best any policy can do (1.0 when the labels follow it).
    """
    def accuracy(predict) -> float:
        return sum(predict(s) == s["decision_truth"] for s in test) / len(test)

    def majority_by(feature) -> float:
        votes: dict = {}
        for sample in train:
            votes.setdefault(feature(sample), Counter())[sample["decision_truth"]] += 1
        overall = Counter(s["decision_truth"] for s in train).most_common(1)[0][0]
        return accuracy(lambda s: votes[feature(s)].most_common(1)[0][0] if feature(s) in votes else overall)

    return {
        "always_continue": accuracy(lambda s: "continue"),
        "majority_by_answers": majority_by(_answers_so_far),
        "majority_by_condition_and_known": majority_by(_known_so_far),
        "rule": accuracy(lambda s: "stop" if pharmacist_stops(s["diagn"], s["messages"]) else "continue"),
    }
