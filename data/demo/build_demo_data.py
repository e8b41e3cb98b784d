"""Build the small demo instruction dataset shipped with the repo.

Writes ``train.jsonl`` and ``validation.jsonl`` next to this file. Standard library only and
fully deterministic: running it again reproduces both files byte-for-byte.

Rows have the keys ``instruction`` (str), ``input`` (str, may be empty) and ``output`` (str); about
one row in five also has a ``system`` prompt, and its output follows that prompt.

Two sources are mixed:
  * hand-written rows (``HAND_WRITTEN`` and ``SYSTEM_ROWS`` below);
  * rows generated from templates whose answers are computed in code (arithmetic, unit
    conversions, string tasks, sorting, capital cities, date formats, JSON look-ups).

Usage: python data/demo/build_demo_data.py
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

SEED = 20240611
N_TOTAL = 360
N_VALIDATION = 40  # every 9th row of a category-stratified ordering goes to validation
SYSTEM_RATE = 0.2  # share of generated rows that get a system prompt
OUT_DIR = Path(__file__).resolve().parent

Row = dict[str, str]

# ---------------------------------------------------------------------------------------------
# Hand-written rows: (instruction, input, output), grouped by category.
# ---------------------------------------------------------------------------------------------

HAND_WRITTEN: dict[str, list[tuple[str, str, str]]] = {
    "general": [
        (
            "What is the boiling point of water at sea level in degrees Celsius?",
            "",
            "At sea level, water boils at 100 degrees Celsius.",
        ),
        (
            "How many continents are there?",
            "",
            "By the most common convention there are seven continents: Africa, Antarctica, Asia, "
            "Australia (Oceania), Europe, North America and South America.",
        ),
        (
            "What gas do plants take in from the air for photosynthesis?",
            "",
            "Plants take in carbon dioxide and, using light and water, turn it into sugars.",
        ),
        ("Which planet is closest to the Sun?", "", "Mercury is the planet closest to the Sun."),
        ("What is the largest ocean on Earth?", "", "The Pacific Ocean is the largest ocean on Earth."),
        ("Who wrote the play Romeo and Juliet?", "", "William Shakespeare wrote Romeo and Juliet."),
        (
            "What is the chemical symbol for gold?",
            "",
            "The chemical symbol for gold is Au, from the Latin word aurum.",
        ),
        ("How many sides does a hexagon have?", "", "A hexagon has six sides."),
        (
            "At what temperature does water freeze in Fahrenheit?",
            "",
            "Water freezes at 32 degrees Fahrenheit.",
        ),
        (
            "What is the hardest natural substance?",
            "",
            "Diamond is the hardest naturally occurring substance.",
        ),
        ("How many bones does an adult human have?", "", "An adult human typically has 206 bones."),
        (
            "What is the main language spoken in Brazil?",
            "",
            "The main language spoken in Brazil is Portuguese.",
        ),
        ("Which organ pumps blood around the human body?", "", "The heart pumps blood around the body."),
        (
            "Approximately how fast does light travel in a vacuum?",
            "",
            "Light travels at about 300,000 kilometres per second in a vacuum (exactly 299,792,458 "
            "metres per second).",
        ),
        ("What is the smallest prime number?", "", "The smallest prime number is 2."),
        (
            "Which is the longest bone in the human body?",
            "",
            "The femur, or thigh bone, is the longest bone in the human body.",
        ),
        ("What does DNA stand for?", "", "DNA stands for deoxyribonucleic acid."),
        (
            "In which year did humans first land on the Moon?",
            "",
            "Humans first landed on the Moon in 1969, during NASA's Apollo 11 mission.",
        ),
        (
            "What is the largest planet in our solar system?",
            "",
            "Jupiter is the largest planet in our solar system.",
        ),
        (
            "How many players does a football (soccer) team have on the pitch?",
            "",
            "Each team has 11 players on the pitch, including the goalkeeper.",
        ),
    ],
    "explain": [
        (
            "Explain what a leap year is.",
            "",
            "A leap year has 366 days instead of 365, with an extra day on 29 February. It keeps the "
            "calendar in step with Earth's orbit, which takes about 365.24 days.",
        ),
        (
            "Why does the sky look blue?",
            "",
            "Air molecules scatter short blue wavelengths of sunlight much more than longer red ones, "
            "an effect called Rayleigh scattering. This scattered blue light reaches our eyes from all "
            "directions, so the sky looks blue.",
        ),
        (
            "What is the difference between weather and climate?",
            "",
            "Weather is the short-term state of the atmosphere, such as today's rain or temperature. "
            "Climate is the typical pattern of weather in a region averaged over many years.",
        ),
        (
            "Explain what an API is in simple terms.",
            "",
            "An API (application programming interface) is a set of rules that lets one program ask "
            "another for data or services without knowing how it works inside.",
        ),
        (
            "What is compound interest?",
            "",
            "Compound interest is interest earned on both the original amount and on interest already "
            "added. Because of this, savings or debts grow faster over time than with simple interest.",
        ),
        (
            "Why do we have seasons on Earth?",
            "",
            "Earth's axis is tilted by about 23.5 degrees. As Earth orbits the Sun, each hemisphere in "
            "turn leans towards the Sun, getting more direct sunlight and longer days in its summer.",
        ),
        (
            "What is the difference between a virus and a bacterium?",
            "",
            "Bacteria are single-celled organisms that can reproduce on their own, while viruses are "
            "much smaller and can only multiply inside a host's cells. Antibiotics work against "
            "bacteria but not against viruses.",
        ),
        (
            "Explain what version control is.",
            "",
            "Version control is a system that records changes to files over time, so you can see the "
            "history, go back to earlier versions and let several people work on the same project. "
            "Git is a popular example.",
        ),
        (
            "What is photosynthesis?",
            "",
            "Photosynthesis is the process by which plants, algae and some bacteria use light energy to "
            "turn carbon dioxide and water into glucose, releasing oxygen.",
        ),
        (
            "What is the purpose of a unit test?",
            "",
            "A unit test checks that a small, isolated piece of code, such as one function, behaves as "
            "expected. It catches bugs early and makes later changes safer.",
        ),
        (
            "Explain the difference between RAM and storage.",
            "",
            "RAM is fast, temporary memory for the data a computer is using right now, and it is "
            "cleared when the power goes off. Storage, such as an SSD, is slower but keeps files "
            "permanently.",
        ),
        (
            "What is a haiku?",
            "",
            "A haiku is a short poem form from Japan with three lines of 5, 7 and 5 syllables, often "
            "about nature or a single moment.",
        ),
        (
            "What is a noun?",
            "",
            "A noun is a word that names a person, place, thing or idea, such as 'teacher', 'Paris', "
            "'book' or 'freedom'.",
        ),
        (
            "Explain recycling in one or two sentences.",
            "",
            "Recycling means collecting used materials such as paper, glass, metal and plastic and "
            "processing them into new products. It saves raw materials and reduces waste.",
        ),
    ],
    "rewrite": [
        (
            "Rewrite the sentence in the passive voice.",
            "The chef cooked a delicious meal.",
            "A delicious meal was cooked by the chef.",
        ),
        (
            "Rewrite this message so it sounds more formal.",
            "Hey, can you send me the report asap?",
            "Could you please send me the report at your earliest convenience?",
        ),
        (
            "Fix the grammar in this sentence.",
            "She don't like apples and she have a orange.",
            "She doesn't like apples, and she has an orange.",
        ),
        (
            "Rewrite the sentence in the past tense.",
            "I walk to the park and feed the ducks.",
            "I walked to the park and fed the ducks.",
        ),
        (
            "Make this sentence shorter without changing its meaning.",
            "Due to the fact that it was raining, we made the decision to stay inside.",
            "Because it was raining, we decided to stay inside.",
        ),
        (
            "Rewrite this sentence in plain English.",
            "Utilisation of the facility is prohibited subsequent to 10 p.m.",
            "You cannot use the facility after 10 p.m.",
        ),
        (
            "Rewrite the sentence in the active voice.",
            "The window was broken by the ball.",
            "The ball broke the window.",
        ),
        (
            "Rewrite this instruction so it sounds friendlier.",
            "Submit your form by Friday.",
            "Please remember to send in your form by Friday. Thank you!",
        ),
        (
            "Correct the spelling mistakes.",
            "I recieved the pakage yesturday.",
            "I received the package yesterday.",
        ),
        (
            "Turn this statement into a yes/no question.",
            "The train leaves at nine o'clock.",
            "Does the train leave at nine o'clock?",
        ),
        (
            "Rewrite the sentence in the future tense.",
            "We visit our grandparents.",
            "We will visit our grandparents.",
        ),
        (
            "Replace the word 'happy' with a stronger synonym.",
            "The children were happy to see the snow.",
            "The children were delighted to see the snow.",
        ),
    ],
    "summarise": [
        (
            "Summarise the text in one sentence.",
            "The city council met on Tuesday to discuss the new bike lane project. After two hours of "
            "debate, members voted seven to two in favour of building lanes on Main Street and Oak "
            "Avenue. Construction is expected to begin in the spring and take about four months.",
            "The city council voted 7-2 to build bike lanes on Main Street and Oak Avenue, with about "
            "four months of construction starting in the spring.",
        ),
        (
            "Summarise this short story in one sentence.",
            "Maria opened a small bakery in her hometown in 2015. At first she sold only bread, but "
            "customers kept asking for cakes, so she learned to bake them. Today the bakery employs "
            "twelve people and sells more cakes than bread.",
            "Maria's bakery started in 2015 selling bread, added cakes because customers asked for "
            "them, and now has twelve staff and sells mostly cakes.",
        ),
        (
            "Summarise the passage briefly.",
            "Honeybees share the location of food using a movement called the waggle dance. The angle "
            "of the dance shows the direction of the food relative to the sun, and the length of the "
            "waggle shows how far away it is. Other bees watch the dance and then fly to the food.",
            "Honeybees use the waggle dance to show other bees where food is: its angle gives the "
            "direction relative to the sun and its length gives the distance.",
        ),
        (
            "Summarise this email in one sentence.",
            "Hi team, the office will be closed on Monday for maintenance of the heating system. "
            "Please work from home that day. Meetings will continue online as scheduled. The office "
            "reopens on Tuesday at 8 a.m. Thanks, Dana",
            "The office is closed on Monday for heating maintenance, so staff should work from home "
            "and meet online until it reopens on Tuesday at 8 a.m.",
        ),
        (
            "Summarise the customer review.",
            "I bought this kettle last month. It boils water very quickly and looks nice on the "
            "counter. However, the lid is hard to open with one hand and the handle gets a little "
            "warm. Overall I am happy with it.",
            "The reviewer is happy overall: the kettle is fast and looks good, but the lid is hard to "
            "open one-handed and the handle gets warm.",
        ),
        (
            "Summarise the paragraph in one sentence.",
            "Regular exercise strengthens the heart and muscles, helps control weight and improves "
            "sleep. Studies also link it to better mood and lower stress. Health agencies commonly "
            "recommend at least 150 minutes of moderate activity per week for adults.",
            "Regular exercise benefits both body and mind, and adults are commonly advised to get at "
            "least 150 minutes of moderate activity a week.",
        ),
        (
            "Write a short headline for this news text.",
            "After three days of searching, the Lopez family found their dog, Biscuit, sleeping in a "
            "neighbour's garden shed. Biscuit had slipped out during a thunderstorm. He was hungry "
            "but unharmed.",
            "Missing Dog Biscuit Found Safe in Neighbour's Shed",
        ),
        (
            "What is the main point of this text? Answer in one sentence.",
            "Many people believe goldfish have a three-second memory, but experiments show they can "
            "remember things for months. Researchers have trained goldfish to respond to sounds and "
            "to push levers for food, and the fish kept these skills long after training.",
            "Contrary to the popular myth, goldfish can remember what they have learned for months.",
        ),
        (
            "List the three key facts in this notice.",
            "The museum opens at 9 a.m. and closes at 5 p.m. Entry is free for children under 12. "
            "Guided tours run every hour on the hour.",
            "1. The museum is open from 9 a.m. to 5 p.m. 2. Children under 12 enter free. "
            "3. Guided tours start every hour on the hour.",
        ),
        (
            "Summarise the announcement in one sentence.",
            "The town library is extending its opening hours from next month. It will now stay open "
            "until 8 p.m. on weekdays instead of 6 p.m. The change follows a survey in which most "
            "residents asked for evening access.",
            "After residents asked for evening access, the town library will stay open until 8 p.m. "
            "on weekdays from next month.",
        ),
    ],
    "classify": [
        (
            "Classify the sentiment of this review as positive, negative or neutral.",
            "The food was cold and the waiter ignored us.",
            "negative",
        ),
        (
            "Classify the sentiment of this review as positive, negative or neutral.",
            "Absolutely loved the concert, best night of the year!",
            "positive",
        ),
        (
            "Classify the sentiment of this review as positive, negative or neutral.",
            "The package arrived on Wednesday.",
            "neutral",
        ),
        (
            "Classify the sentiment of this review as positive, negative or neutral.",
            "The battery dies after two hours. Very disappointing.",
            "negative",
        ),
        (
            "Classify the sentiment of this review as positive, negative or neutral.",
            "The room was spotless and the staff were very kind.",
            "positive",
        ),
        (
            "Is this email spam or not spam?",
            "Congratulations! You have won a free cruise. Click here and enter your card details to claim it.",
            "spam",
        ),
        (
            "Is this email spam or not spam?",
            "Hi Alex, the meeting has moved to 3 p.m. tomorrow. See you there.",
            "not spam",
        ),
        ("Classify the animal as a mammal, bird, reptile, fish or amphibian.", "dolphin", "mammal"),
        ("Classify the animal as a mammal, bird, reptile, fish or amphibian.", "frog", "amphibian"),
        ("Classify the animal as a mammal, bird, reptile, fish or amphibian.", "penguin", "bird"),
        ("Classify the animal as a mammal, bird, reptile, fish or amphibian.", "crocodile", "reptile"),
        ("Classify the animal as a mammal, bird, reptile, fish or amphibian.", "shark", "fish"),
        ("Is this food a fruit, a vegetable or a grain?", "carrot", "vegetable"),
        ("Is this food a fruit, a vegetable or a grain?", "rice", "grain"),
        ("Is this food a fruit, a vegetable or a grain?", "banana", "fruit"),
        ("Is this sentence a question, a command or a statement?", "Close the door, please.", "command"),
        ("Is this sentence a question, a command or a statement?", "The sun rises in the east.", "statement"),
        ("Is this sentence a question, a command or a statement?", "Where did you park the car?", "question"),
        ("Is this statement a fact or an opinion?", "Chocolate ice cream is the best flavour.", "opinion"),
        ("Is this statement a fact or an opinion?", "Paris is the capital of France.", "fact"),
        (
            "Which topic does this headline belong to: sports, politics, technology or health?",
            "New smartphone chip doubles battery life",
            "technology",
        ),
        (
            "Which topic does this headline belong to: sports, politics, technology or health?",
            "Local team wins the championship after a penalty shootout",
            "sports",
        ),
        (
            "What part of speech is the word 'quickly' in this sentence?",
            "She ran quickly to catch the bus.",
            "'quickly' is an adverb; it describes how she ran.",
        ),
    ],
    "translate": [
        ("Translate into French.", "Good morning.", "Bonjour."),
        ("Translate into French.", "Thank you very much.", "Merci beaucoup."),
        ("Translate into French.", "Where is the train station?", "Où est la gare ?"),
        ("Translate into French.", "I am hungry.", "J'ai faim."),
        ("Translate into French.", "The cat is black.", "Le chat est noir."),
        ("Translate into French.", "See you tomorrow.", "À demain."),
        ("Translate into French.", "What time is it?", "Quelle heure est-il ?"),
        ("Translate into French.", "I like reading books.", "J'aime lire des livres."),
        ("Translate into French.", "Happy birthday!", "Joyeux anniversaire !"),
        ("Translate into Spanish.", "Good night.", "Buenas noches."),
        ("Translate into Spanish.", "How are you?", "¿Cómo estás?"),
        ("Translate into Spanish.", "I have two brothers.", "Tengo dos hermanos."),
        ("Translate into Spanish.", "The water is cold.", "El agua está fría."),
        ("Translate into Spanish.", "Where is the bathroom?", "¿Dónde está el baño?"),
        ("Translate into Spanish.", "My name is Anna.", "Me llamo Anna."),
        ("Translate into Spanish.", "I live in a small house.", "Vivo en una casa pequeña."),
        ("Translate into Spanish.", "Happy birthday!", "¡Feliz cumpleaños!"),
    ],
    "code": [
        ("In Python, how do you get the number of elements in a list called items?", "", "Use len(items)."),
        (
            "What does the Python expression 7 // 2 evaluate to?",
            "",
            "It evaluates to 3, because // is floor division.",
        ),
        ("What does this Python code print?", "print(2 ** 3)", "It prints 8, because ** is exponentiation."),
        (
            "Write a Python function that returns the square of a number.",
            "",
            "def square(x):\n    return x * x",
        ),
        (
            "How do you write a single-line comment in JavaScript?",
            "",
            "Start it with two slashes, for example: // this is a comment",
        ),
        ("What does HTML stand for?", "", "HTML stands for HyperText Markup Language."),
        ("Write a SQL query that selects all columns from a table named users.", "", "SELECT * FROM users;"),
        (
            "In Python, how do you convert the string '42' to an integer?",
            "",
            "Use int('42'), which returns the integer 42.",
        ),
        (
            "What is the difference between a list and a tuple in Python?",
            "",
            "A list is mutable, so its elements can be changed, while a tuple cannot be changed once "
            "created. Lists use square brackets and tuples use parentheses.",
        ),
        (
            "Fix the bug in this Python function.",
            "def add(a, b):\n    return a - b",
            "The function subtracts instead of adding. Corrected version:\ndef add(a, b):\n    return a + b",
        ),
        (
            "What does this Python code print?",
            "x = [1, 2, 3]\nprint(x[-1])",
            "It prints 3, because index -1 refers to the last element.",
        ),
        (
            "Which Git command shows the current branch and which files have changed?",
            "",
            "git status",
        ),
        (
            "Write a Python list comprehension for the even numbers from 0 to 10 inclusive.",
            "",
            "[n for n in range(11) if n % 2 == 0]",
        ),
        ("What does this Python code print?", "print('abc'.upper())", "ABC"),
        (
            "What is the time complexity of binary search on a sorted array?",
            "",
            "Binary search runs in O(log n) time.",
        ),
        (
            "Which SQL clause is used to filter rows?",
            "",
            "The WHERE clause, for example: SELECT * FROM orders WHERE total > 100;",
        ),
        ("What does CSS stand for?", "", "CSS stands for Cascading Style Sheets."),
        ("How do you create an empty dictionary in Python?", "", "Use {} or dict()."),
    ],
    "misc": [
        (
            "Give three tips for better sleep.",
            "",
            "1. Go to bed and wake up at the same time each day. 2. Avoid screens for an hour before "
            "bed. 3. Keep your bedroom cool, dark and quiet.",
        ),
        ("Suggest a name for a coffee shop next to a library.", "", "How about 'Chapter One Coffee'?"),
        (
            "Write a haiku about autumn.",
            "",
            "Crisp leaves drift and fall\nGolden light on quiet paths\nThe year breathes slowly",
        ),
        ("Give an antonym for 'ancient'.", "", "modern"),
        ("Give a synonym for 'big'.", "", "large"),
        (
            "What are the primary colours of light?",
            "",
            "The primary colours of light are red, green and blue.",
        ),
        (
            "Name three renewable energy sources.",
            "",
            "Solar, wind and hydroelectric power are three renewable energy sources.",
        ),
        (
            "Write a polite one-sentence reply declining a meeting invitation.",
            "",
            "Thank you for the invitation, but unfortunately I will not be able to attend the meeting.",
        ),
        ("What is the plural of 'mouse'?", "", "The plural of 'mouse' is 'mice'."),
        ("What is the past tense of 'go'?", "", "The past tense of 'go' is 'went'."),
        (
            "Put these words in alphabetical order.",
            "pear, apple, mango, banana",
            "apple, banana, mango, pear",
        ),
        (
            "List the names of the people mentioned in this sentence.",
            "Yesterday Priya met Tom and Elena at the station.",
            "Priya, Tom, Elena",
        ),
        (
            "Give a short definition of the word 'ephemeral'.",
            "",
            "Ephemeral means lasting for a very short time.",
        ),
    ],
}

# Hand-written rows that carry a system prompt: (system, instruction, input, output).
CONCISE = "You are a concise assistant. Answer in one sentence."
MATH_TUTOR = "You are a math tutor. Show the final answer only."
FRENCH = "You are a helpful assistant. Always reply in French."
SPANISH = "You are a helpful assistant. Always reply in Spanish."
YES_NO = "Answer with only 'yes' or 'no'."
CODE_ONLY = "You are a coding assistant. Reply with code only, no explanation."
KIDS = "You are a friendly assistant for young children. Use short, simple words."
JSON_ONLY = "You reply in JSON only."
BULLETS = "You are a helpful assistant. Format every answer as a bulleted list."
ANSWER_ONLY = "Reply with the answer only, nothing else."
NUMBER_ONLY = "You are a concise assistant. Answer with a single number."
VALUE_UNIT = "Respond with only the final value and its unit."
ONE_NAME = "Answer with the name only."

SYSTEM_ROWS: list[tuple[str, str, str, str]] = [
    (
        CONCISE,
        "Why do leaves change colour in autumn?",
        "",
        "In autumn trees stop making green chlorophyll, so yellow and orange pigments show through "
        "and some species also produce red ones.",
    ),
    (
        CONCISE,
        "What is inflation?",
        "",
        "Inflation is the general rise in prices over time, so each unit of money buys less.",
    ),
    (
        CONCISE,
        "How does a refrigerator keep food cold?",
        "",
        "A refrigerator circulates a refrigerant that absorbs heat inside the fridge as it evaporates "
        "and releases that heat outside when it is compressed and condensed.",
    ),
    (
        CONCISE,
        "What is a password manager for?",
        "",
        "A password manager generates and securely stores strong, unique passwords so you do not "
        "have to remember them all.",
    ),
    (
        CONCISE,
        "What causes ocean tides?",
        "",
        "Tides are caused mainly by the Moon's gravity pulling on Earth's oceans, with a smaller "
        "effect from the Sun.",
    ),
    (
        CONCISE,
        "Summarise this notice.",
        "The school science fair will take place on 14 May in the main hall. Students from all "
        "grades can take part, either alone or in pairs. Projects must be registered with a teacher "
        "by 30 April.",
        "The school science fair is on 14 May in the main hall, open to students of all grades alone "
        "or in pairs, with projects registered by 30 April.",
    ),
    (MATH_TUTOR, "What is 15% of 80?", "", "12"),
    (MATH_TUTOR, "Solve for x: 3x + 5 = 20.", "", "x = 5"),
    (MATH_TUTOR, "What is the area of a rectangle that is 7 cm long and 4 cm wide?", "", "28 cm²"),
    (MATH_TUTOR, "What is the square root of 144?", "", "12"),
    (MATH_TUTOR, "A car travels 150 km in 3 hours. What is its average speed?", "", "50 km/h"),
    (FRENCH, "What colour is the sky on a clear day?", "", "Par temps clair, le ciel est bleu."),
    (FRENCH, "How many days are there in a week?", "", "Il y a sept jours dans une semaine."),
    (SPANISH, "Which city is the capital of Spain?", "", "La capital de España es Madrid."),
    (SPANISH, "Name a yellow fruit.", "", "El limón es una fruta amarilla."),
    (YES_NO, "Is a tomato a fruit in botanical terms?", "", "yes"),
    (YES_NO, "Is 21 a prime number?", "", "no"),
    (YES_NO, "Does water boil at a lower temperature at high altitude?", "", "yes"),
    (CODE_ONLY, "Write a Python expression that reverses the string s.", "", "s[::-1]"),
    (
        CODE_ONLY,
        "Write a SQL query that counts the rows in the table orders.",
        "",
        "SELECT COUNT(*) FROM orders;",
    ),
    (
        CODE_ONLY,
        "Write a Python function is_even(n) that returns True when n is even.",
        "",
        "def is_even(n):\n    return n % 2 == 0",
    ),
    (
        KIDS,
        "What is a volcano?",
        "",
        "A volcano is a mountain with a hole at the top. Sometimes very hot melted rock, called lava, comes out of it.",
    ),
    (
        KIDS,
        "Why do we need to sleep?",
        "",
        "Sleep lets your body rest and grow. It also helps your brain remember what you learned that day.",
    ),
    (JSON_ONLY, "Give the name and capital of Italy.", "", '{"country": "Italy", "capital": "Rome"}'),
    (
        JSON_ONLY,
        "Extract the person's name and age from the text.",
        "Lena is 34 years old and works as a nurse.",
        '{"name": "Lena", "age": 34}',
    ),
    (BULLETS, "Name the three traditional primary colours used in painting.", "", "- Red\n- Yellow\n- Blue"),
    (
        BULLETS,
        "Give three tips for saving energy at home.",
        "",
        "- Switch off lights when you leave a room\n- Use LED bulbs\n- Unplug chargers that are not in use",
    ),
]

# ---------------------------------------------------------------------------------------------
# Tables used by the template generators.
# ---------------------------------------------------------------------------------------------

NAMES = ["Ava", "Liam", "Noah", "Mia", "Zara", "Omar", "Ines", "Kenji", "Lucia", "Tomas", "Priya", "Ben"]
ITEMS = ["apples", "stickers", "marbles", "pencils", "books", "cookies", "stamps", "seashells"]

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("the United Kingdom", "London"),
    ("Ireland", "Dublin"),
    ("Belgium", "Brussels"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"),
    ("Denmark", "Copenhagen"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Iceland", "Reykjavik"),
    ("Turkey", "Ankara"),
    ("Egypt", "Cairo"),
    ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Kenya", "Nairobi"),
    ("Ethiopia", "Addis Ababa"),
    ("India", "New Delhi"),
    ("Pakistan", "Islamabad"),
    ("Nepal", "Kathmandu"),
    ("China", "Beijing"),
    ("Japan", "Tokyo"),
    ("South Korea", "Seoul"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("the Philippines", "Manila"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
    ("Canada", "Ottawa"),
    ("Mexico", "Mexico City"),
    ("Cuba", "Havana"),
    ("Brazil", "Brasília"),
    ("Argentina", "Buenos Aires"),
    ("Chile", "Santiago"),
    ("Peru", "Lima"),
    ("Colombia", "Bogotá"),
]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Rain fell softly on the old tin roof all night.",
    "My sister plays the violin every Saturday morning.",
    "We planted tomatoes and beans in the garden.",
    "A good map makes a long journey much easier.",
    "The library closes early on public holidays.",
    "Please bring a pencil and an eraser to the exam.",
    "Seven green parrots sat quietly on the fence.",
    "He baked fresh bread for the whole neighbourhood.",
    "Cold winds blew across the frozen lake.",
    "Our team finished the project two days early.",
    "She reads the newspaper with her morning coffee.",
    "Bright stars filled the clear desert sky.",
    "The museum has a famous painting of a ship.",
    "Dogs and cats can live happily together.",
    "Fresh lemonade is perfect on a hot afternoon.",
    "The children built a tall castle of sand.",
    "Every Monday the market sells local cheese.",
    "Turn left at the bakery and walk to the end of the road.",
    "The old clock in the hall still keeps perfect time.",
]

WORDS = [
    "planet",
    "garden",
    "window",
    "pencil",
    "orange",
    "rocket",
    "silver",
    "castle",
    "python",
    "bridge",
    "forest",
    "market",
    "yellow",
    "kitchen",
    "blanket",
    "thunder",
    "journey",
    "lantern",
    "harvest",
    "compass",
    "dolphin",
    "volcano",
    "picture",
    "elephant",
    "umbrella",
    "notebook",
    "sandwich",
    "butterfly",
]

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# (from unit, to unit, factor); values are chosen so results are exact.
CONVERSIONS: list[tuple[str, str, Fraction]] = [
    ("kilometres", "metres", Fraction(1000)),
    ("metres", "centimetres", Fraction(100)),
    ("kilograms", "grams", Fraction(1000)),
    ("hours", "minutes", Fraction(60)),
    ("minutes", "seconds", Fraction(60)),
    ("litres", "millilitres", Fraction(1000)),
    ("days", "hours", Fraction(24)),
    ("feet", "inches", Fraction(12)),
    ("inches", "centimetres", Fraction(254, 100)),
    ("grams", "kilograms", Fraction(1, 1000)),
    ("centimetres", "metres", Fraction(1, 100)),
    ("millilitres", "litres", Fraction(1, 1000)),
    ("minutes", "hours", Fraction(1, 60)),
]

FIRST_NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana", "Ivan", "Jade", "Kofi", "Lea"]
CITIES = ["Lisbon", "Oslo", "Lima", "Nairobi", "Osaka", "Toronto", "Dublin", "Porto", "Quito", "Seville"]
TAGS = ["new", "sale", "popular", "eco", "limited", "gift", "imported", "handmade"]
PRODUCTS = ["lamp", "chair", "kettle", "backpack", "notebook", "umbrella", "mug", "scarf"]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def fmt_num(value: Fraction | int) -> str:
    """Exact decimal rendering with thousands separators (e.g. 3500 -> '3,500', 5/2 -> '2.5')."""
    value = Fraction(value)
    sign = "-" if value < 0 else ""
    value = abs(value)
    whole = value.numerator // value.denominator
    rest = value - whole
    if rest == 0:
        return f"{sign}{whole:,}"
    for places in range(1, 7):
        scaled = rest * 10**places
        if scaled.denominator == 1:
            return f"{sign}{whole:,}.{scaled.numerator:0{places}d}"
    raise ValueError(f"{value} has no short exact decimal form")


def make_row(instruction: str, output: str, input_text: str = "", system: str | None = None) -> Row:
    row: Row = {}
    if system is not None:
        row["system"] = system
    row["instruction"] = instruction
    row["input"] = input_text
    row["output"] = output
    return row


def long_date(d: dt.date) -> str:
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def random_date(rng: random.Random) -> dt.date:
    start = dt.date(1985, 1, 1).toordinal()
    end = dt.date(2030, 12, 31).toordinal()
    return dt.date.fromordinal(rng.randint(start, end))


# ---------------------------------------------------------------------------------------------
# Template generators. Each takes (rng, with_system) and returns one row with a computed answer.
# ---------------------------------------------------------------------------------------------


def gen_arithmetic(rng: random.Random, sys_: bool) -> Row:
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    kind = rng.choice(["add", "sub", "mul", "div", "price", "change", "percent", "time"])
    if kind == "add":
        a, b = rng.randint(3, 60), rng.randint(2, 40)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        ans, full = a + b, f"{name} now has {a} + {b} = {a + b} {item}."
    elif kind == "sub":
        a = rng.randint(10, 80)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} of them to a friend. How many {item} are left?"
        ans, full = a - b, f"{name} has {a} - {b} = {a - b} {item} left."
    elif kind == "mul":
        a, b = rng.randint(3, 15), rng.randint(2, 12)
        q = f"A box holds {a} {item}. How many {item} are there in {b} boxes?"
        ans, full = a * b, f"{b} boxes hold {b} x {a} = {a * b} {item}."
    elif kind == "div":
        b, k = rng.randint(2, 9), rng.randint(2, 12)
        a = b * k
        q = f"{a} {item} are shared equally among {b} children. How many {item} does each child get?"
        ans, full = k, f"Each child gets {a} / {b} = {k} {item}."
    elif kind == "price":
        p, n = rng.randint(2, 25), rng.randint(2, 9)
        q = f"One notebook costs ${p}. How much do {n} notebooks cost?"
        ans, full = f"${p * n}", f"{n} notebooks cost {n} x ${p} = ${p * n}."
    elif kind == "change":
        note = rng.choice([10, 20, 50, 100])
        cost = rng.randint(1, note - 1)
        q = f"{name} pays for a ${cost} item with a ${note} note. How much change should {name} get?"
        ans, full = f"${note - cost}", f"{name} should get ${note} - ${cost} = ${note - cost} in change."
    elif kind == "percent":
        pct = rng.choice([5, 10, 20, 25, 50, 75])
        base = rng.randint(1, 20) * (100 // _gcd(pct, 100))
        val = base * pct // 100
        assert val * 100 == base * pct
        q = f"What is {pct}% of {base}?"
        ans, full = val, f"{pct}% of {base} is {val}."
    else:  # time
        h, m = rng.randint(8, 18), rng.choice(range(0, 60, 5))
        dur = rng.choice(range(25, 180, 5))
        end = h * 60 + m + dur
        start_s, end_s = f"{h:02d}:{m:02d}", f"{end // 60:02d}:{end % 60:02d}"
        q = f"A film starts at {start_s} and lasts {dur} minutes. At what time does it end?"
        ans, full = end_s, f"The film ends at {end_s}."
    if sys_:
        return make_row(q, str(ans), system=MATH_TUTOR)
    return make_row(q, full)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def gen_units(rng: random.Random, sys_: bool) -> Row:
    if rng.random() < 0.2:  # temperature: Celsius multiples of 5 give whole Fahrenheit values
        c = rng.choice(range(-20, 45, 5))
        f = c * 9 // 5 + 32
        assert f == Fraction(c * 9, 5) + 32
        if rng.random() < 0.5:
            src, dst = f"{c} degrees Celsius", f"{f} degrees Fahrenheit"
            target = "degrees Fahrenheit"
        else:
            src, dst = f"{f} degrees Fahrenheit", f"{c} degrees Celsius"
            target = "degrees Celsius"
    else:
        frm, to, factor = rng.choice(CONVERSIONS)
        while True:
            if factor >= 1:
                value = (
                    Fraction(rng.randint(2, 40)) if rng.random() < 0.75 else Fraction(rng.randint(3, 19), 2)
                )
            elif factor == Fraction(1, 60):
                value = Fraction(rng.randint(5, 20) * 15)
            elif factor == Fraction(1, 100):
                value = Fraction(rng.randint(3, 60) * 10)
            else:
                value = Fraction(rng.randint(3, 60) * 250)
            result = value * factor
            if result != 1:
                break
        src, dst = f"{fmt_num(value)} {frm}", f"{fmt_num(result)} {to}"
        target = to
    if rng.random() < 0.5:
        q, inp = f"Convert {src} to {target}.", ""
    else:
        q, inp = f"Convert the following measurement to {target}.", src
    if sys_:
        return make_row(q, dst, inp, system=VALUE_UNIT)
    return make_row(q, f"{src} is {dst}.", inp)


def gen_reverse(rng: random.Random, sys_: bool) -> Row:
    word = rng.choice(WORDS)
    if rng.random() < 0.5:
        q, inp = "Reverse the letters of the given word.", word
    else:
        q, inp = f"Write the word '{word}' backwards.", ""
    rev = word[::-1]
    if sys_:
        return make_row(q, rev, inp, system=ANSWER_ONLY)
    return make_row(q, f"'{word}' written backwards is '{rev}'.", inp)


def gen_count_letters(rng: random.Random, sys_: bool) -> Row:
    sentence = rng.choice(SENTENCES)
    letters = sorted({ch for ch in sentence.lower() if ch.isalpha()})
    letter = rng.choice(letters)
    n = sentence.lower().count(letter)
    q = f"How many times does the letter '{letter}' appear in the text below? Ignore upper and lower case."
    if sys_:
        return make_row(q, str(n), sentence, system=NUMBER_ONLY)
    times = "once" if n == 1 else f"{n} times"
    return make_row(q, f"The letter '{letter}' appears {times}.", sentence)


def gen_count_words(rng: random.Random, sys_: bool) -> Row:
    sentence = rng.choice(SENTENCES)
    n = len(sentence.split())
    q = rng.choice(
        [
            "How many words are in the following sentence?",
            "Count the words in this sentence.",
            "Give the word count of the text below.",
        ]
    )
    if sys_:
        return make_row(q, str(n), sentence, system=NUMBER_ONLY)
    return make_row(q, f"The sentence has {n} words.", sentence)


def gen_sort(rng: random.Random, sys_: bool) -> Row:
    k = rng.randint(4, 8)
    low = -20 if rng.random() < 0.25 else 0
    nums = rng.sample(range(low, 100), k)
    descending = rng.random() < 0.35
    order = "descending" if descending else "ascending"
    q = f"Sort these numbers in {order} order."
    inp = ", ".join(map(str, nums))
    out = ", ".join(map(str, sorted(nums, reverse=descending)))
    return make_row(q, out, inp, system=ANSWER_ONLY if sys_ else None)


def gen_capital(rng: random.Random, sys_: bool) -> Row:
    country, city = rng.choice(CAPITALS)
    country_cap = country[0].upper() + country[1:]
    if rng.random() < 0.6:
        q = f"What is the capital of {country}?"
        full, short = f"The capital of {country} is {city}.", city
    else:
        q = f"{city} is the capital of which country?"
        full, short = f"{city} is the capital of {country}.", country_cap
    if sys_:
        if rng.random() < 0.5:
            return make_row(q, short, system=ONE_NAME)
        return make_row(q, full, system=CONCISE)
    return make_row(q, full)


def gen_date(rng: random.Random, sys_: bool) -> Row:
    d = random_date(rng)
    iso = d.isoformat()
    kind = rng.choice(["iso_to_dmy", "iso_to_long", "words_to_iso", "us_to_iso", "weekday"])
    if kind == "iso_to_dmy":
        q, inp = "Convert this date from YYYY-MM-DD to DD/MM/YYYY format.", iso
        ans = f"{d.day:02d}/{d.month:02d}/{d.year}"
        full = f"{iso} is {ans} in DD/MM/YYYY format."
    elif kind == "iso_to_long":
        q, inp = "Write this ISO date in the form 'Month D, YYYY'.", iso
        ans = long_date(d)
        full = f"{iso} is {ans}."
    elif kind == "words_to_iso":
        q, inp = (
            "Convert this date to ISO 8601 format (YYYY-MM-DD).",
            f"{d.day} {MONTHS[d.month - 1]} {d.year}",
        )
        ans = iso
        full = f"{inp} is {iso} in ISO 8601 format."
    elif kind == "us_to_iso":
        us = f"{d.month:02d}/{d.day:02d}/{d.year}"
        q, inp = "This date is written in US format (MM/DD/YYYY). Convert it to YYYY-MM-DD.", us
        ans = iso
        full = f"{us} in US format is {iso}."
    else:
        q, inp = "What day of the week is this date?", long_date(d)
        ans = WEEKDAYS[d.weekday()]
        full = f"{long_date(d)} is a {ans}."
    if sys_:
        return make_row(q, ans, inp, system=ANSWER_ONLY)
    return make_row(q, full, inp)


def gen_json(rng: random.Random, sys_: bool) -> Row:
    kind = rng.choice(["flat", "flat", "nested", "keys", "array"])
    if kind in ("flat", "keys"):
        obj: dict[str, object] = {
            "name": rng.choice(FIRST_NAMES),
            "age": rng.randint(18, 80),
            "city": rng.choice(CITIES),
        }
        if rng.random() < 0.5:
            obj["active"] = rng.random() < 0.5
        if rng.random() < 0.4:
            obj["score"] = rng.randint(0, 100)
        inp = json.dumps(obj, ensure_ascii=False)
        if kind == "keys":
            q = "List the top-level keys of this JSON object, in order."
            keys = list(obj)
            if sys_:
                return make_row(q, json.dumps(keys), inp, system=JSON_ONLY)
            return make_row(q, ", ".join(keys), inp)
        key = rng.choice(list(obj))
        q = f'What is the value of the key "{key}" in this JSON object?'
        value = obj[key]
        if sys_:
            return make_row(q, json.dumps({key: value}, ensure_ascii=False), inp, system=JSON_ONLY)
        return make_row(q, f'The value of "{key}" is {json.dumps(value, ensure_ascii=False)}.', inp)
    if kind == "nested":
        customer = {"name": rng.choice(FIRST_NAMES), "city": rng.choice(CITIES)}
        order = {"id": rng.randint(1000, 9999), "items": rng.randint(1, 9), "customer": customer}
        inp = json.dumps({"order": order}, ensure_ascii=False)
        path, value = rng.choice(
            [
                ("order.id", order["id"]),
                ("order.items", order["items"]),
                ("order.customer.name", customer["name"]),
                ("order.customer.city", customer["city"]),
            ]
        )
        q = f"In the JSON below, what is the value at the path {path}?"
        if sys_:
            return make_row(q, json.dumps({"value": value}, ensure_ascii=False), inp, system=JSON_ONLY)
        return make_row(q, f"The value at {path} is {json.dumps(value, ensure_ascii=False)}.", inp)
    tags = rng.sample(TAGS, rng.randint(1, 5))
    product = {"product": rng.choice(PRODUCTS), "price": rng.randint(5, 120), "tags": tags}
    inp = json.dumps(product, ensure_ascii=False)
    q = 'How many elements are in the "tags" array of this JSON object?'
    n = len(tags)
    if sys_:
        return make_row(q, json.dumps({"count": n}), inp, system=JSON_ONLY)
    return make_row(q, f'The "tags" array has {n} element{"" if n == 1 else "s"}.', inp)


# Relative weights of the generated categories (the total is fixed by N_TOTAL).
GENERATORS: list[tuple[str, Callable[[random.Random, bool], Row], int]] = [
    ("arithmetic", gen_arithmetic, 40),
    ("units", gen_units, 30),
    ("reverse", gen_reverse, 20),
    ("count_letters", gen_count_letters, 18),
    ("count_words", gen_count_words, 16),
    ("sort", gen_sort, 22),
    ("capital", gen_capital, 30),
    ("date", gen_date, 30),
    ("json", gen_json, 26),
]


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------


def key_of(row: Row) -> tuple[str, str]:
    return (row["instruction"], row["input"])


def build_rows(rng: random.Random) -> list[tuple[str, Row]]:
    """Return (category, row) pairs: all hand-written rows plus generated rows up to N_TOTAL."""
    tagged: list[tuple[str, Row]] = []
    seen: set[tuple[str, str]] = set()

    def add(category: str, row: Row) -> bool:
        k = key_of(row)
        if k in seen:
            return False
        seen.add(k)
        tagged.append((category, row))
        return True

    for category, rows in HAND_WRITTEN.items():
        for instruction, input_text, output in rows:
            assert add(category, make_row(instruction, output, input_text)), instruction
    for system, instruction, input_text, output in SYSTEM_ROWS:
        assert add("system", make_row(instruction, output, input_text, system=system)), instruction

    n_generated = N_TOTAL - len(tagged)
    total_weight = sum(w for _, _, w in GENERATORS)
    quotas = [n_generated * w // total_weight for _, _, w in GENERATORS]
    for i in range(n_generated - sum(quotas)):  # hand out the rounding remainder
        quotas[i % len(quotas)] += 1

    for (category, gen, _), quota in zip(GENERATORS, quotas, strict=True):
        made = attempts = 0
        while made < quota:
            attempts += 1
            if attempts > 10_000:
                raise RuntimeError(f"could not generate {quota} unique rows for {category}")
            if add(category, gen(rng, rng.random() < SYSTEM_RATE)):
                made += 1
    return tagged


def check(rows: list[Row]) -> None:
    for row in rows:
        assert set(row) <= {"system", "instruction", "input", "output"}, row
        for field in ("instruction", "output"):
            assert isinstance(row[field], str) and row[field].strip(), row
        assert isinstance(row["input"], str), row
        if "system" in row:
            assert isinstance(row["system"], str) and row["system"].strip(), row
        n_words = sum(len(row[f].split()) for f in ("instruction", "input", "output"))
        assert n_words < 250, row


def split(rng: random.Random, tagged: list[tuple[str, Row]]) -> tuple[list[Row], list[Row]]:
    """Stratified split: order rows by category (shuffled within it), send every k-th to validation."""
    by_cat: dict[str, list[Row]] = {}
    for category, row in tagged:
        by_cat.setdefault(category, []).append(row)
    ordered: list[Row] = []
    for category in by_cat:  # insertion order: deterministic
        rows = by_cat[category]
        rng.shuffle(rows)
        ordered.extend(rows)
    step = len(ordered) // N_VALIDATION
    offset = step // 2
    val_idx = set(range(offset, offset + step * N_VALIDATION, step))
    train = [r for i, r in enumerate(ordered) if i not in val_idx]
    validation = [r for i, r in enumerate(ordered) if i in val_idx]
    rng.shuffle(train)
    rng.shuffle(validation)
    return train, validation


def write_jsonl(path: Path, rows: list[Row]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(SEED)
    tagged = build_rows(rng)
    assert len(tagged) == N_TOTAL, len(tagged)
    train, validation = split(rng, tagged)
    check(train + validation)
    assert not {key_of(r) for r in train} & {key_of(r) for r in validation}
    write_jsonl(OUT_DIR / "train.jsonl", train)
    write_jsonl(OUT_DIR / "validation.jsonl", validation)
    for name, rows in (("train", train), ("validation", validation)):
        n_sys = sum("system" in r for r in rows)
        print(f"{name}: {len(rows)} rows ({n_sys} with a system prompt)")


if __name__ == "__main__":
    main()
