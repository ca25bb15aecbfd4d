"""Write examples/requests.jsonl: a realistic batch job in the OpenAI Batch API input format.

Run `python examples/make_requests.py` to regenerate it; the output is deterministic (seeded random).

The job is sized for the demo model (SmolLM2-135M-Instruct): about 180 chat requests that share one of four
long system prompts (support-ticket triage, review sentiment, booking-field extraction, language detection),
interleaved in a random order so that a prefix-aware scheduler has something to regroup, plus 10 plain
"/v1/completions" requests. Every request uses `temperature: 0`.

Deliberately bad lines, scattered through the file, each on a line of its own. Every one of them is an error
for that line only: the rest of the job still runs. Expected errors:

  1. malformed JSON          - a request cut off mid-object: the line is not valid JSON (parse error).
  2. missing custom_id       - a valid request with no "custom_id": "custom_id is required".
  3. duplicate custom_id     - reuses the custom_id of an EARLIER line: the second occurrence is rejected
                               ("duplicate custom_id"); the first one runs normally.
  4. method "GET"            - "method must be POST".
  5. url "/v1/embeddings"    - unsupported endpoint: only /v1/chat/completions and /v1/completions.
  6. body is a string        - "body must be a JSON object".
  7. max_tokens: -5          - "max_tokens must be an integer >= 1" (as SamplingParams says).
  8. temperature: "hot"      - "temperature must be a number >= 0" (as SamplingParams says).
  9. messages not a list     - chat body whose "messages" is a string: "messages must be a list".
 10. blank line              - NOT an error: blank lines are skipped.

The bad lines that can be named by custom_id (4-9) carry fresh ids that continue their task's series (e.g.
"triage-0048"); the malformed line is cut off after its custom_id, and line 3 reuses an earlier line's id. Running
this script prints the line number of each bad line.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEED = 20250611
OUT = Path(__file__).with_name("requests.jsonl")
MODEL = "default"
CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"

# Requests per task (the bad lines come on top of these).
COUNTS = {"triage": 46, "sentiment": 46, "extract": 44, "langid": 40, "complete": 10}
MAX_TOKENS = {"triage": 8, "sentiment": 8, "extract": 48, "langid": 8, "complete": 32}

# ----------------------------------------------------------------------------------------------------------------
# The four shared system prompts (100-200 words each).

SYSTEM_PROMPTS = {
    "triage": (
        "You are the triage assistant for the support team of Northwind Home, an online shop that sells "
        "furniture, kitchenware and small electronics. Each message is one ticket written by a customer. Decide "
        "what the customer mainly needs and answer with exactly one category from this fixed list:\n"
        "billing - charges, refunds, invoices, payment methods, discount codes;\n"
        "shipping - delivery times, tracking, lost or damaged parcels;\n"
        "technical - the website, the app or a device that does not work;\n"
        "account - login, passwords, email changes, deleting accounts, privacy;\n"
        "other - anything else, including general questions and compliments.\n"
        "If a ticket mentions several problems, choose the one the customer asks you to solve first. Answer "
        "with the category name only, in lower case, with no punctuation and no explanation."
    ),
    "sentiment": (
        "You are a sentiment classifier for product reviews posted on a retail website. Each message is one "
        "review of a product the customer bought. Answer with exactly one word: positive, negative or neutral.\n"
        "Use positive when the reviewer is mostly satisfied or recommends the product, even if they mention a "
        "small drawback. Use negative when the reviewer is mostly dissatisfied, returns the product, warns other "
        "buyers or describes a defect. Use neutral when the review is factual, evenly mixed, or says nothing "
        "about the product itself, for example a comment on the delivery or a question.\n"
        "Judge the words alone. Do not explain your answer and do not add punctuation. Answer in lower case "
        "with a single word."
    ),
    "extract": (
        "You extract structured data from short messages sent to a hotel booking desk by guests and travel "
        'agents. Return one JSON object with exactly three keys, in this order: "name", "city" and "date".\n'
        '- "name": the full name of the guest, as written, or null.\n'
        '- "city": the city of the stay, in English spelling, or null.\n'
        '- "date": the arrival date as YYYY-MM-DD; if the year is missing, assume 2025; null if no date is '
        "given.\n"
        "Do not guess values that are not in the message and do not add other keys. Output only the JSON "
        "object on one line, with double quotes, no code fences and no comments.\n"
        'Example: {"name": "Ana Silva", "city": "Lisbon", "date": "2025-06-03"}'
    ),
    "langid": (
        "You are a language identification service that routes customer emails to the right regional team. "
        "Identify the language the message is written in and answer with its two-letter ISO 639-1 code in "
        "lower case: en for English, fr for French, de for German, es for Spanish, it for Italian, pt for "
        "Portuguese, nl for Dutch, and so on.\n"
        "Judge the language of the sentences, not of names, brands, order numbers or cities: a French sentence "
        "that mentions London is still French. If the text mixes languages, answer with the language of most "
        "of the words. If you cannot tell, answer und.\n"
        "Answer with the code only: no explanation, no punctuation and no quotation marks."
    ),
}

# ----------------------------------------------------------------------------------------------------------------
# Vocabulary for the templates.

PRODUCTS = [
    "standing desk", "espresso machine", "air fryer", "desk lamp", "robot vacuum", "electric kettle",
    "office chair", "bluetooth speaker", "bookshelf", "toaster", "smart thermostat", "cast-iron skillet",
    "blender", "wireless headphones", "bedside table", "rice cooker", "coffee grinder", "floor lamp",
    "knife set", "air purifier", "sofa bed", "stand mixer", "wall clock", "dining chair",
]
CITIES = [
    "Lisbon", "Porto", "Madrid", "Valencia", "Lyon", "Marseille", "Berlin", "Hamburg", "Munich", "Vienna",
    "Zurich", "Milan", "Turin", "Rome", "Amsterdam", "Rotterdam", "Brussels", "Dublin", "Edinburgh", "Leeds",
    "Bristol", "Copenhagen", "Stockholm", "Oslo", "Prague", "Krakow", "Budapest", "Athens",
]
FIRST_NAMES = [
    "Maria", "James", "Sofia", "Lukas", "Emma", "Mateo", "Chloe", "Noah", "Ines", "Oliver", "Freya", "Hugo",
    "Amara", "Elias", "Yuki", "Priya", "Tomasz", "Leila", "Santiago", "Greta", "Omar", "Hannah", "Rafael", "Nora",
]
LAST_NAMES = [
    "Lopez", "Carter", "Rossi", "Becker", "Dubois", "Silva", "Novak", "Jensen", "O'Brien", "Kowalski", "Patel",
    "Tanaka", "Moreau", "Fischer", "Haddad", "Andersson", "Costa", "Murphy", "Schmidt", "Nakamura", "Ferreira",
]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PHONES = ["iPhone 13", "Pixel 7", "Galaxy S22", "iPhone SE", "OnePlus 11", "Moto G54"]
BROWSERS = ["Firefox", "Chrome", "Safari", "Edge"]
APP_SCREENS = ["settings", "order history", "wishlist", "checkout", "notifications"]
COLOURS = ["orange", "red", "blue", "white"]
ROOMS = ["kitchen", "living room", "home office", "bedroom", "hallway"]
RELATIVES = ["sister", "father", "grandmother", "best friend", "colleague", "son"]
OPENINGS = ["", "", "Hello, ", "Hi, ", "Hi there, ", "Good morning, ", "Dear support, "]
CLOSINGS = ["", "", " Thanks.", " Thank you!", " Regards, {name}", " Cheers, {first}", " Please help."]


def full_name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def email(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES).lower()}.{rng.choice(LAST_NAMES).lower().replace(chr(39), '')}@example.com"


def fill(rng: random.Random, template: str) -> str:
    """Fill every slot a template may use with a fresh random choice."""
    first = rng.choice(FIRST_NAMES)
    slots = {
        "product": rng.choice(PRODUCTS),
        "product2": rng.choice(PRODUCTS),
        "city": rng.choice(CITIES),
        "name": f"{first} {rng.choice(LAST_NAMES)}",
        "first": first,
        "order": str(rng.randint(100000, 999999)),
        "amount": f"€{rng.randint(19, 899)}.{rng.choice(['00', '50', '95', '99'])}",
        "code": rng.choice(["SPRING15", "WELCOME10", "FREESHIP", "BLACKFRIDAY", "STUDENT20"]),
        "errcode": str(rng.randint(10, 99)),
        "weekday": rng.choice(WEEKDAYS),
        "days": str(rng.randint(3, 14)),
        "weeks": str(rng.randint(2, 6)),
        "phone": rng.choice(PHONES),
        "browser": rng.choice(BROWSERS),
        "screen": rng.choice(APP_SCREENS),
        "colour": rng.choice(COLOURS),
        "room": rng.choice(ROOMS),
        "relative": rng.choice(RELATIVES),
        "email": email(rng),
        "stars": str(rng.randint(1, 5)),
    }
    return template.format(**slots)


# ----------------------------------------------------------------------------------------------------------------
# Task 1: support-ticket triage.

TRIAGE_TEMPLATES = {
    "billing": [
        "I was charged twice for order #{order}: {amount} left my account on {weekday} and again the next "
        "morning. Please refund the duplicate payment.",
        "My discount code {code} wasn't applied at checkout, so I paid full price for the {product}. Can you "
        "refund the difference?",
        "Where is my refund? I returned the {product} {weeks} weeks ago and the money still hasn't come back to "
        "my card.",
        "Could you send me a VAT invoice for order #{order}? I need it for my company's expense report.",
        "Can I pay for the {product} with a bank transfer instead of a credit card? My card keeps getting "
        "declined.",
        "The price of the {product} dropped by {amount} two days after I bought it. Do you offer a price match?",
    ],
    "shipping": [
        "My parcel with the {product} has been stuck in {city} for {days} days and the tracking page hasn't "
        "changed since {weekday}.",
        "The {product} arrived today but the box was crushed and the product is badly scratched. What should I "
        "do?",
        "The courier left my package at the wrong address. I've asked all the neighbours and nobody has it. "
        "Order #{order}.",
        "Do you deliver to {city}? I'm moving there next month and want to order a {product} before I go.",
        "The tracking number you emailed me for order #{order} says 'not found' on the courier's website.",
        "I ordered a {product} and a {product2} together but only the {product2} was delivered.",
    ],
    "technical": [
        "The app crashes every time I open the {screen} page on my {phone}. I've reinstalled it twice already.",
        "Since the last firmware update the {product} won't connect to Wi-Fi. The light just keeps blinking "
        "{colour}.",
        "The checkout button on your website does nothing when I click it in {browser}. I already tried "
        "clearing the cache and cookies.",
        "My {product} stopped working after {days} days. It turns on, shows error code E{errcode} and then "
        "switches itself off.",
        "Your website shows the {product} as in stock but the app says it is sold out. Which one is right?",
        "The assembly video linked in the manual for the {product} gives a 404 error.",
    ],
    "account": [
        "I can't log in since I reset my password yesterday. The site says my email {email} is not registered.",
        "Please delete my account and all the personal data you hold about me, as allowed under GDPR.",
        "How do I change the email address on my account from {email} to my new work address?",
        "I seem to have two accounts with the same name. Can you merge them so I keep my order history?",
        "I never receive the verification code by SMS, so I'm locked out of my account on my {phone}.",
        "Someone changed the delivery address on my account without my permission. I think it was hacked.",
    ],
    "other": [
        "Do you have a showroom in {city} where I can see the {product} before buying it?",
        "Just wanted to say the staff in your {city} store were incredibly helpful last week. Thank you!",
        "Are you hiring? I'd love to work in your {city} warehouse this summer.",
        "Do you offer gift wrapping for the {product}? It's a birthday present for my {relative}.",
        "Is the {product} made in Europe, and what materials are used in it? I try to shop sustainably.",
        "Will you have a sale on kitchen appliances this autumn? I'm waiting to buy a {product}.",
    ],
}


def triage_message(rng: random.Random) -> str:
    category = rng.choice(list(TRIAGE_TEMPLATES))
    body = fill(rng, rng.choice(TRIAGE_TEMPLATES[category]))
    opening = rng.choice(OPENINGS)
    if opening:
        keep_capital = body[0] == "I" and not body[1].isalpha()  # "I", "I'm", "I've"
        body = opening + (body if keep_capital else body[0].lower() + body[1:])
    return body + fill(rng, rng.choice(CLOSINGS))


# ----------------------------------------------------------------------------------------------------------------
# Task 2: sentiment of product reviews.

POSITIVE_DETAILS = [
    "It was easy to set up and feels really solid.",
    "Quiet, fast and much better than the one I had before.",
    "The build quality is excellent for the price.",
    "My whole family uses it every day.",
    "It arrived well packed and works perfectly.",
]
NEGATIVE_DETAILS = [
    "The plastic feels cheap and one of the screws was missing.",
    "It is far louder than the description claims.",
    "Customer service never answered my emails.",
    "The paint started peeling after the first wash.",
    "It overheats after ten minutes and switches off.",
]
SENTIMENT_TEMPLATES = [
    "Absolutely love this {product}. {pos} Would buy again without hesitation.",
    "Five stars. The {product} does exactly what I hoped and looks great in my {room}. {pos}",
    "Bought the {product} as a gift for my {relative} and they were thrilled. {pos}",
    "Honestly impressed. {pos} The only small downside is that the cable is a bit short.",
    "The {product} broke after {weeks} weeks. {neg} Very disappointed, I'm sending it back.",
    "Do not buy this {product}. {neg} Save your money.",
    "Looked nice in the photos but in reality it's a let-down. {neg}",
    "Second one I've had to return. {neg} I expected more from this brand.",
    "The {product} arrived on time. It does what the description says, nothing more and nothing less.",
    "Delivery took {days} days. I haven't used the {product} yet, so I can't comment on the quality.",
    "Does the {product} come with a plug for UK sockets, or do I need an adapter?",
    "It's an ordinary {product}. Some things are good, some are not. {pos} {neg}",
]


def sentiment_message(rng: random.Random) -> str:
    template = rng.choice(SENTIMENT_TEMPLATES)
    template = template.replace("{pos}", rng.choice(POSITIVE_DETAILS)).replace("{neg}", rng.choice(NEGATIVE_DETAILS))
    return fill(rng, template)


# ----------------------------------------------------------------------------------------------------------------
# Task 3: extract {name, city, date} from booking messages.


def some_date(rng: random.Random) -> str:
    day, month = rng.randint(1, 28), rng.randint(1, 12)
    style = rng.randrange(5)
    if style == 0:
        return f"{day} {MONTHS[month - 1]}"
    if style == 1:
        return f"{MONTHS[month - 1]} {day}, 2025"
    if style == 2:
        return f"2025-{month:02d}-{day:02d}"
    if style == 3:
        return f"{day:02d}/{month:02d}/2025"
    suffix = {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd"}.get(day, "th")
    return f"the {day}{suffix} of {MONTHS[month - 1]}"


EXTRACT_TEMPLATES = [
    "Hi, this is {name}. I'm arriving in {city} on {date} and would like a quiet room away from the lift, please.",
    "Booking request from our agency: guest {name}, check-in {date}, hotel in central {city}, two nights, "
    "breakfast included.",
    "Could you confirm the reservation for {name} in {city}? Arrival on {date}, probably late in the evening.",
    "{name} will attend the trade fair in {city} starting {date}; please arrange an airport transfer as well.",
    "Please cancel the room booked for {name} on {date}. Something came up and the trip is off.",
    "We need a twin room in {city} from {date} for Mr {last} and a colleague. Invoice to the company, please.",
    "Hello! My name is {name} and I'd like to extend my stay in {city} by one night. Thanks in advance.",
    "Change of plans: {name} now arrives in {city} on {date} instead of the original date. Same room type.",
]


def extract_message(rng: random.Random) -> str:
    template = rng.choice(EXTRACT_TEMPLATES)
    return template.format(
        name=full_name(rng), city=rng.choice(CITIES), date=some_date(rng), last=rng.choice(LAST_NAMES)
    )


# ----------------------------------------------------------------------------------------------------------------
# Task 4: language identification.

LANGUAGES: dict[str, dict[str, list[str]]] = {
    "en": {
        "templates": [
            "Hi, my order number {n} still hasn't arrived in {city}. Could you tell me when it will be delivered? "
            "Thanks, {name}",
            "I got the parcel yesterday but the device doesn't work. I'd like to send it back and get my money "
            "back as soon as possible.",
            "Is the {obj} still in stock at your {city} store? I'd like to come by on Saturday morning.",
            "I can't log into my account since the last update. I've already reset my password {k} times.",
        ],
        "objs": ["kettle", "desk lamp", "toaster"],
        "cities": ["Leeds", "Bristol", "Manchester", "Dublin"],
        "names": ["Emma Clarke", "Oliver Hughes", "Siobhan Walsh"],
    },
    "fr": {
        "templates": [
            "Bonjour, ma commande n° {n} n'est toujours pas arrivée à {city}. Pouvez-vous me dire quand elle sera "
            "livrée ? Merci d'avance, {name}",
            "J'ai reçu le colis hier, mais l'appareil ne fonctionne pas. Je voudrais le renvoyer et être "
            "remboursé le plus vite possible.",
            "Est-ce que {obj} est encore disponible dans votre magasin de {city} ? Je voudrais passer samedi "
            "matin.",
            "Je n'arrive plus à me connecter à mon compte depuis la dernière mise à jour. J'ai déjà changé mon "
            "mot de passe {k} fois.",
        ],
        "objs": ["la bouilloire", "la lampe de bureau", "le grille-pain"],
        "cities": ["Lyon", "Bordeaux", "Lille", "London"],
        "names": ["Camille Martin", "Julien Moreau", "Léa Dubois"],
    },
    "de": {
        "templates": [
            "Guten Tag, meine Bestellung Nr. {n} ist noch nicht in {city} angekommen. Können Sie mir bitte sagen, "
            "wann sie geliefert wird? Viele Grüße, {name}",
            "Ich habe das Paket gestern bekommen, aber das Gerät funktioniert leider nicht. Ich möchte es "
            "zurückschicken und mein Geld zurückbekommen.",
            "Ist {obj} in Ihrer Filiale in {city} noch vorrätig? Ich würde gern am Samstagvormittag vorbeikommen.",
            "Seit dem letzten Update kann ich mich nicht mehr in mein Konto einloggen. Ich habe mein Passwort "
            "schon {k} Mal zurückgesetzt.",
        ],
        "objs": ["der Wasserkocher", "die Schreibtischlampe", "der Toaster"],
        "cities": ["München", "Hamburg", "Köln", "Paris"],
        "names": ["Lukas Becker", "Anna Schmidt", "Jonas Weber"],
    },
    "es": {
        "templates": [
            "Hola, mi pedido número {n} todavía no ha llegado a {city}. ¿Podrían decirme cuándo lo van a "
            "entregar? Gracias, {name}",
            "Recibí el paquete ayer, pero el aparato no funciona. Quiero devolverlo y que me reembolsen el dinero "
            "lo antes posible.",
            "¿Tienen {obj} disponible en la tienda de {city}? Me gustaría pasar el sábado por la mañana.",
            "No puedo entrar en mi cuenta desde la última actualización. Ya he cambiado la contraseña {k} veces.",
        ],
        "objs": ["el hervidor", "la lámpara de escritorio", "la tostadora"],
        "cities": ["Sevilla", "Valencia", "Bilbao", "Berlin"],
        "names": ["Lucía García", "Mateo Fernández", "Carmen Ruiz"],
    },
    "it": {
        "templates": [
            "Buongiorno, il mio ordine numero {n} non è ancora arrivato a {city}. Potreste dirmi quando verrà "
            "consegnato? Grazie, {name}",
            "Ho ricevuto il pacco ieri, ma l'apparecchio non funziona. Vorrei restituirlo e ottenere un rimborso "
            "il prima possibile.",
            "Avete {obj} disponibile nel negozio di {city}? Vorrei passare sabato mattina.",
            "Non riesco più ad accedere al mio account dall'ultimo aggiornamento. Ho già cambiato la password "
            "{k} volte.",
        ],
        "objs": ["il bollitore", "la lampada da scrivania", "il tostapane"],
        "cities": ["Torino", "Bologna", "Napoli", "Madrid"],
        "names": ["Giulia Rossi", "Marco Bianchi", "Francesca Romano"],
    },
    "pt": {
        "templates": [
            "Olá, a minha encomenda número {n} ainda não chegou a {city}. Podem dizer-me quando vai ser entregue? "
            "Obrigado, {name}",
            "Recebi a encomenda ontem, mas o aparelho não funciona. Quero devolvê-lo e receber o reembolso o mais "
            "depressa possível.",
            "Têm {obj} disponível na loja de {city}? Gostaria de passar lá no sábado de manhã.",
            "Não consigo entrar na minha conta desde a última atualização. Já mudei a palavra-passe {k} vezes.",
        ],
        "objs": ["a chaleira", "o candeeiro de secretária", "a torradeira"],
        "cities": ["Lisboa", "Braga", "Coimbra", "Londres"],
        "names": ["Inês Ferreira", "João Costa", "Beatriz Santos"],
    },
    "nl": {
        "templates": [
            "Hallo, mijn bestelling met nummer {n} is nog steeds niet aangekomen in {city}. Kunt u mij laten weten "
            "wanneer die wordt bezorgd? Groeten, {name}",
            "Ik heb het pakket gisteren ontvangen, maar het apparaat werkt niet. Ik wil het terugsturen en mijn "
            "geld terugkrijgen.",
            "Is {obj} nog op voorraad in uw winkel in {city}? Ik wil zaterdagochtend langskomen.",
            "Sinds de laatste update kan ik niet meer inloggen op mijn account. Ik heb mijn wachtwoord al {k} keer "
            "opnieuw ingesteld.",
        ],
        "objs": ["de waterkoker", "de bureaulamp", "het broodrooster"],
        "cities": ["Utrecht", "Rotterdam", "Eindhoven", "Brussel"],
        "names": ["Sanne de Vries", "Daan Jansen", "Lotte Bakker"],
    },
}


def langid_message(rng: random.Random) -> str:
    lang = LANGUAGES[rng.choice(sorted(LANGUAGES))]
    template = rng.choice(lang["templates"])
    return template.format(
        n=rng.randint(100000, 999999), city=rng.choice(lang["cities"]), name=rng.choice(lang["names"]),
        obj=rng.choice(lang["objs"]), k=rng.randint(2, 5),
    )


# ----------------------------------------------------------------------------------------------------------------
# Task 5: plain completions.

COMPLETION_PROMPTS = [
    "Complete the sentence: The best way to keep a sourdough starter alive is",
    "Complete the sentence: On a rainy afternoon in {city}, the most pleasant thing to do is",
    "Complete the sentence: Before assembling a new {product}, you should always",
    "Complete the sentence: A good customer support reply starts with",
    "Complete the sentence: The three most important things to pack for a weekend in {city} are",
    "Complete the sentence: To make a cup of tea properly, first",
    "Complete the sentence: The main advantage of a {product} over cheaper alternatives is",
    "Complete the sentence: When a parcel is late, the first thing to check is",
    "Complete the sentence: The easiest way to learn a new language is",
    "Complete the sentence: If your {product} stops working, the first thing to try is",
]

MESSAGE_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "triage": triage_message,
    "sentiment": sentiment_message,
    "extract": extract_message,
    "langid": langid_message,
}


def chat_request(task: str, number: int, user: str) -> dict[str, Any]:
    return {
        "custom_id": f"{task}-{number:04d}",
        "method": "POST",
        "url": CHAT_URL,
        "body": {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPTS[task]},
                {"role": "user", "content": user},
            ],
            "max_tokens": MAX_TOKENS[task],
            "temperature": 0,
        },
    }


def completion_request(number: int, prompt: str) -> dict[str, Any]:
    return {
        "custom_id": f"complete-{number:04d}",
        "method": "POST",
        "url": COMPLETIONS_URL,
        "body": {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS["complete"], "temperature": 0,
                 "stop": ["\n"]},
    }


def good_requests(rng: random.Random) -> list[dict[str, Any]]:
    """The valid requests, shuffled so that the four shared prefixes are interleaved."""
    requests: list[dict[str, Any]] = []
    for task, make in MESSAGE_MAKERS.items():
        seen: set[str] = set()
        number = 0
        while number < COUNTS[task]:
            user = make(rng)
            if user in seen:  # keep the user messages distinct
                continue
            seen.add(user)
            number += 1
            requests.append(chat_request(task, number, user))
    for number, prompt in enumerate(COMPLETION_PROMPTS, start=1):
        requests.append(completion_request(number, fill(rng, prompt)))
    rng.shuffle(requests)
    return requests


def bad_lines(rng: random.Random, earlier_id: str) -> list[tuple[str, str]]:
    """(label, raw line) for each deliberately bad line. `earlier_id` is a custom_id already in the file."""
    extra = {task: COUNTS[task] for task in COUNTS}

    def next_request(task: str) -> dict[str, Any]:
        extra[task] += 1
        return chat_request(task, extra[task], MESSAGE_MAKERS[task](rng))

    def dump(obj: dict[str, Any]) -> str:
        return json.dumps(obj, ensure_ascii=False)

    malformed = dump(next_request("sentiment"))
    malformed = malformed[: malformed.index(', "max_tokens"')]  # cut off: unclosed body and object

    missing_id = next_request("triage")
    del missing_id["custom_id"]

    duplicate = next_request("extract")
    duplicate["custom_id"] = earlier_id

    get = next_request("langid")
    get["method"] = "GET"

    embeddings = next_request("sentiment")
    embeddings["url"] = "/v1/embeddings"  # the body stays a valid chat body: the url is the only fault

    string_body = next_request("triage")
    string_body["body"] = json.dumps(string_body["body"], ensure_ascii=False)  # the body, encoded twice

    negative = next_request("extract")
    negative["body"]["max_tokens"] = -5

    hot = next_request("sentiment")
    hot["body"]["temperature"] = "hot"

    not_list = next_request("triage")
    not_list["body"]["messages"] = not_list["body"]["messages"][1]["content"]

    return [
        ("malformed JSON", malformed),
        ("missing custom_id", dump(missing_id)),
        ("duplicate custom_id", dump(duplicate)),
        ('method "GET"', dump(get)),
        ('url "/v1/embeddings"', dump(embeddings)),
        ("body is a string", dump(string_body)),
        ("max_tokens: -5", dump(negative)),
        ('temperature: "hot"', dump(hot)),
        ("messages not a list", dump(not_list)),
        ("blank line (skipped, not an error)", ""),
    ]


def build(seed: int = SEED) -> tuple[list[str], list[tuple[int, str]]]:
    """The file's lines, and (1-based line number, label) for each bad line."""
    rng = random.Random(seed)
    good = good_requests(rng)
    lines = [json.dumps(request, ensure_ascii=False) for request in good]
    total = len(lines) + 10
    # Ten distinct positions away from the very start, spread over the file.
    positions = sorted(rng.sample(range(5, total - 1), 10))
    earlier_id = good[rng.randrange(positions[2] - 2)]["custom_id"]  # a line before the duplicate's slot
    bad = bad_lines(rng, earlier_id)
    report: list[tuple[int, str]] = []
    for position, (label, line) in zip(positions, bad):
        lines.insert(position, line)
        report.append((position + 1, label))
    return lines, report


def main() -> None:
    lines, report = build()
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} lines, {OUT.stat().st_size / 1024:.0f} KiB, to {OUT}")
    for number, label in report:
        print(f"  line {number:3d}: {label}")


if __name__ == "__main__":
    main()
