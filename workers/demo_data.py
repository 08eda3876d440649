"""Built-in demo data: a synthetic catalog and simulated users, deterministic given a seed.

All text is hand-written for this project and assembled combinatorially from small
per-category vocabularies; nothing is taken from an external data set. Standard library only.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

CATEGORIES: tuple[str, ...] = (
    "cooking",
    "football",
    "astronomy",
    "jazz",
    "gardening",
    "programming",
    "travel",
    "fitness",
)

_SCENES: tuple[str, ...] = ("home", "mobile", "tv")
_NOISE_CLICK_SHARE = 0.1


@dataclass(frozen=True)
class _Vocab:
    """One category's vocabulary: ``title`` uses {mod} and {subject}; templates use {detail} and {mod}."""

    title: str
    tag: str
    subjects: tuple[tuple[str, str, str], ...]  # (title words, description detail, tag)
    modifiers: tuple[tuple[str, str, str], ...]  # (title words, description phrase, tag)
    templates: tuple[str, ...]
    queries: tuple[str, ...]


_VOCAB: dict[str, _Vocab] = {
    "cooking": _Vocab(
        title="{mod} {subject}",
        tag="recipe",
        subjects=(
            ("Saffron Risotto", "creamy arborio rice simmered with saffron and finished with parmesan", "risotto"),
            ("Lemon Garlic Chicken", "tender chicken thighs roasted with lemon, garlic and fresh thyme", "chicken"),
            ("Mushroom Stroganoff", "earthy mushrooms in a paprika and sour cream sauce over buttered noodles", "mushroom"),
            ("Coconut Curry", "a fragrant curry simmered in coconut milk with cumin, turmeric and ginger", "curry"),
            ("Beef Stew", "slow-braised beef with carrots, onions and a rich red wine gravy", "stew"),
            ("Pesto Pasta", "al dente pasta tossed with basil pesto, pine nuts and grated pecorino", "pasta"),
            ("Sourdough Bread", "a crusty loaf leavened with a tangy sourdough starter and baked in a hot oven", "bread"),
            ("Lemon Tart", "a buttery shortcrust pastry filled with a silky lemon curd", "dessert"),
            ("Salmon Fillet", "pan-seared salmon with crisp skin, dill butter and steamed greens", "salmon"),
            ("Lentil Soup", "a hearty soup of red lentils, onion and smoked paprika", "soup"),
            ("Buttermilk Pancakes", "fluffy buttermilk pancakes served with maple syrup and berries", "breakfast"),
            ("Chickpea Salad", "chickpeas, cucumber, feta and parsley dressed with olive oil and lemon juice", "salad"),
        ),
        modifiers=(
            ("Weeknight", "ready in under forty minutes for a busy evening", "quick"),
            ("Classic", "cooked the traditional way with simple pantry ingredients", "classic"),
            ("Rustic", "with a hearty, rustic farmhouse-kitchen feel", "rustic"),
            ("Homemade", "made from scratch in your own kitchen", "homemade"),
            ("Grandma's", "based on a cherished family recipe handed down through generations", "heirloom"),
            ("Restaurant-Style", "plated like a dish from a professional chef's kitchen", "chef"),
            ("Budget", "cooked on a tight grocery budget without losing flavour", "budget"),
            ("Make-Ahead", "prepped in advance and reheated for easy weekday meals", "mealprep"),
        ),
        templates=(
            "{Detail}, {mod}.",
            "Step-by-step recipe for {detail}, {mod}. Serves four.",
            "Learn to cook {detail}, {mod}.",
            "Comfort food: {detail}, {mod}.",
        ),
        queries=(
            "easy vegetarian pasta recipes",
            "how to make risotto",
            "quick weeknight dinner ideas",
            "homemade sourdough bread",
            "coconut curry recipe",
            "lemon tart dessert recipe",
            "healthy lentil soup",
            "meal prep recipes for the week",
        ),
    ),
    "football": _Vocab(
        title="{subject} {mod}",
        tag="soccer",
        subjects=(
            ("High Pressing", "how a team presses the opposition's back line to win the ball near goal", "pressing"),
            ("Penalty Kicks", "the striker's run-up, placement and the goalkeeper's dive on penalty kicks", "penalties"),
            ("The Offside Trap", "how defenders step up in a line to catch attackers offside", "offside"),
            ("Counter-Attacks", "fast breaks from defence to attack after winning possession in midfield", "counter"),
            ("Corner Routines", "rehearsed corner kick routines and near-post headers", "corners"),
            ("Goalkeeper Distribution", "how a goalkeeper starts attacks with throws, goal kicks and short passes", "goalkeeper"),
            ("Full-Back Overlaps", "full-backs overlapping the winger to whip crosses into the box", "fullbacks"),
            ("Midfield Rondos", "tight passing rondos that sharpen first touch and midfield control", "rondo"),
            ("Curling Free Kicks", "bending a free kick over the wall and into the top corner", "freekicks"),
            ("Back-Four Defending", "a flat back four holding its shape against wingers and strikers", "defending"),
            ("Striker Finishing", "a centre-forward's movement in the box and first-time finishing", "striker"),
            ("Wing Play", "wingers dribbling past their full-back and crossing for the striker", "wingers"),
        ),
        modifiers=(
            ("Explained", "broken down with clear diagrams of the pitch", "tactics"),
            ("for Youth Coaches", "with drills a coach can run with an under-twelve squad", "coaching"),
            ("Masterclass", "as taught by a former professional midfielder", "masterclass"),
            ("Training Session", "in a full ninety-minute training session on the pitch", "training"),
            ("Match Analysis", "using clips from last weekend's league fixtures", "analysis"),
            ("Through the Decades", "from classic World Cup matches to today's Premier League", "classics"),
            ("Highlights", "in a fast-paced reel of the season's best goals and saves", "highlights"),
            ("Mistakes to Avoid", "highlighting the errors that cost teams goals and points", "errors"),
        ),
        templates=(
            "A look at {detail}, {mod}.",
            "Football tactics video covering {detail}, {mod}.",
            "Everything about {detail}, {mod}.",
            "Soccer breakdown of {detail}, {mod}.",
        ),
        queries=(
            "football pressing tactics",
            "how to take a penalty kick",
            "soccer training drills for kids",
            "offside rule explained",
            "best free kick goals",
            "premier league match analysis",
            "goalkeeper training tips",
            "counter attacking football",
        ),
    ),
    "astronomy": _Vocab(
        title="{mod} {subject}",
        tag="space",
        subjects=(
            ("Jupiter's Moons", "the four Galilean moons Io, Europa, Ganymede and Callisto orbiting the gas giant", "jupiter"),
            ("Saturn's Rings", "the icy ring system of Saturn and the gaps carved by its shepherd moons", "saturn"),
            ("the Andromeda Galaxy", "the spiral galaxy two and a half million light-years away, our nearest large neighbour", "galaxy"),
            ("the Orion Nebula", "the glowing stellar nursery in Orion's sword where new stars are forming", "nebula"),
            ("Lunar Craters", "impact craters on the Moon, best seen along the terminator at first quarter", "moon"),
            ("Meteor Showers", "annual meteor showers like the Perseids and Geminids radiating from comet debris", "meteors"),
            ("Black Holes", "black holes, event horizons and the glowing accretion disks that surround them", "blackholes"),
            ("Exoplanet Transits", "planets around distant stars, detected as they dim their star's light in transit", "exoplanets"),
            ("Solar Eclipses", "total solar eclipses, when the Moon covers the Sun and the corona appears", "eclipse"),
            ("the Milky Way Core", "the dense star clouds at the centre of our galaxy in the summer night sky", "milkyway"),
            ("Mars at Opposition", "the red planet at opposition, when it shines brightest and its polar caps show", "mars"),
            ("Comets", "icy comets and the tails of gas and dust they grow as they approach the Sun", "comets"),
        ),
        modifiers=(
            ("Observing", "with tips on which telescope eyepiece to use under dark skies", "telescope"),
            ("Photographing", "captured with a tracking mount and long-exposure astrophotography", "astrophotography"),
            ("The Science of", "explained through the physics of gravity, light and orbital motion", "astrophysics"),
            ("A Stargazer's Guide to", "for first-time stargazers with only binoculars and a star chart", "stargazing"),
            ("Mapping", "plotted with celestial coordinates and constellation charts", "starchart"),
            ("Hubble's View of", "as seen by the Hubble and James Webb space telescopes", "hubble"),
            ("Deep-Sky Notes on", "recorded in an amateur observer's logbook over several clear nights", "deepsky"),
            ("The Discovery of", "from early astronomers with hand-ground lenses to modern observatories", "discovery"),
        ),
        templates=(
            "An astronomy guide to {detail}, {mod}.",
            "Night-sky feature on {detail}, {mod}.",
            "Explore {detail}, {mod}.",
            "A cosmic journey to {detail}, {mod}.",
        ),
        queries=(
            "how to see jupiter's moons",
            "beginner telescope stargazing",
            "when is the next meteor shower",
            "what is a black hole",
            "photographing the milky way",
            "solar eclipse viewing guide",
            "andromeda galaxy through binoculars",
            "exoplanet discoveries",
        ),
    ),
    "jazz": _Vocab(
        title="{subject}: {mod}",
        tag="jazz",
        subjects=(
            ("Bebop Saxophone", "fast bebop saxophone lines over chord changes in the style of Charlie Parker", "bebop"),
            ("Modal Trumpet", "muted modal trumpet solos inspired by Miles Davis and Kind of Blue", "trumpet"),
            ("Swing Big Band", "a roaring swing big band with brass sections trading riffs", "swing"),
            ("Walking Bass Lines", "upright double bass walking lines that drive a jazz rhythm section", "bass"),
            ("Piano Voicings", "rich jazz piano voicings with extended ninth and thirteenth chords", "piano"),
            ("Brushwork Drumming", "soft brushes on the snare and ride cymbal that keep the swing feel", "drums"),
            ("Cool Jazz Quintet", "a relaxed West Coast cool jazz quintet with airy horn melodies", "cooljazz"),
            ("Hard Bop Standards", "soulful hard bop standards with bluesy horn heads and long solos", "hardbop"),
            ("Bossa Nova Grooves", "gentle bossa nova grooves with nylon-string guitar and syncopated rhythm", "bossanova"),
            ("Scat Singing", "wordless scat singing improvised over swinging changes like Ella Fitzgerald", "vocals"),
            ("Blues Improvisation", "improvising over a twelve-bar jazz blues with blue notes and call-and-response", "blues"),
            ("Fusion Guitar", "electric jazz fusion guitar mixing funk rhythms with complex harmony", "fusion"),
        ),
        modifiers=(
            ("Live at the Club", "recorded live in a smoky basement jazz club", "live"),
            ("Listening Session", "with a guided listening session of classic records", "listening"),
            ("Lesson for Newcomers", "taught step by step for musicians new to improvisation", "lesson"),
            ("Late-Night Set", "played as a mellow late-night set for the final hour", "latenight"),
            ("Improvisation Workshop", "with exercises to build your own solos over the changes", "improv"),
            ("Rare Vinyl Recordings", "drawn from rare vinyl pressings and out-of-print albums", "vinyl"),
            ("Trio Arrangement", "arranged for a piano, bass and drums trio", "trio"),
            ("Legends and Stories", "with stories of the legendary players who shaped the sound", "legends"),
        ),
        templates=(
            "Jazz performance of {detail}, {mod}.",
            "Enjoy {detail}, {mod}.",
            "A jazz feature on {detail}, {mod}.",
            "Dive into {detail}, {mod}.",
        ),
        queries=(
            "classic bebop saxophone records",
            "learn jazz piano chords",
            "miles davis modal jazz",
            "swing big band music",
            "walking bass line lesson",
            "late night jazz playlist",
            "how to improvise over jazz blues",
            "bossa nova guitar",
        ),
    ),
    "gardening": _Vocab(
        title="{subject} {mod}",
        tag="garden",
        subjects=(
            ("Tomato Seedlings", "sowing tomato seeds in trays, pricking out seedlings and potting them on", "tomatoes"),
            ("Rose Pruning", "pruning shrub and climbing roses just above an outward-facing bud", "roses"),
            ("Compost Heaps", "building a compost heap from leaves, grass clippings and peelings", "compost"),
            ("Raised Beds", "building raised beds filled with loam for sowing beans, courgettes and beetroot", "raisedbeds"),
            ("Lavender Hedges", "planting and clipping a fragrant lavender hedge along a sunny path", "lavender"),
            ("Spring Bulbs", "planting tulip and daffodil bulbs in autumn for colour in spring", "bulbs"),
            ("Lawn Care", "mowing, scarifying and feeding a lawn to keep the grass green and thick", "lawn"),
            ("Fruit Trees", "planting and pruning apple and pear trees for a heavy harvest", "orchard"),
            ("Seed Potatoes", "chitting seed potatoes and earthing up the rows as the shoots emerge", "potatoes"),
            ("Climbing Clematis", "tying clematis onto a trellis and choosing the right pruning group", "climbers"),
            ("Wildflower Meadows", "turning a patch of lawn into a wildflower meadow buzzing with bees", "wildflowers"),
            ("Slug Control", "protecting seedlings and hostas from slugs and snails without chemicals", "slugs"),
        ),
        modifiers=(
            ("Made Easy", "explained in simple steps for the first-time gardener", "easy"),
            ("the Organic Way", "using only organic methods, mulch and homemade plant feed", "organic"),
            ("Month by Month", "with a month-by-month planting and pruning calendar", "calendar"),
            ("in Small Gardens", "in a small garden, patio or window box", "smallspace"),
            ("in Clay Soil", "in heavy clay soil improved with grit and leaf mould", "soil"),
            ("on a Shoestring", "using cuttings, saved seeds and recycled pots to save money", "thrifty"),
            ("for Pollinators", "while attracting bees, butterflies and other pollinators", "pollinators"),
            ("in a Cold Climate", "in a frosty northern garden with a short growing season", "frost"),
        ),
        templates=(
            "A gardening guide to {detail}, {mod}.",
            "Practical advice on {detail}, {mod}.",
            "Learn the essentials of {detail}, {mod}.",
            "Garden project: {detail}, {mod}.",
        ),
        queries=(
            "when to prune roses",
            "how to start a compost heap",
            "growing tomatoes from seed",
            "raised bed vegetable garden",
            "organic slug control",
            "planting spring bulbs",
            "wildflower meadow for bees",
            "lawn care tips",
        ),
    ),
    "programming": _Vocab(
        title="{mod} {subject}",
        tag="coding",
        subjects=(
            ("Python Generators", "lazy Python generators, the yield keyword and iterator pipelines", "python"),
            ("Rust Ownership", "Rust's ownership model, borrowing rules and lifetimes checked by the compiler", "rust"),
            ("SQL Joins", "inner, outer and self joins across relational database tables", "sql"),
            ("Git Branching", "feature branches, rebasing and resolving merge conflicts in Git", "git"),
            ("REST API Design", "REST endpoints with clear status codes, pagination and versioning", "api"),
            ("JavaScript Promises", "asynchronous JavaScript with promises, async and await", "javascript"),
            ("Recursion", "recursive functions, base cases and the call stack", "recursion"),
            ("Hash Maps", "hash maps that store key-value pairs and resolve collisions", "hashing"),
            ("Regular Expressions", "regular expressions that match and parse text patterns", "regex"),
            ("Docker Containers", "packaging an application and its dependencies into Docker containers", "docker"),
            ("Type Hints", "static type hints and type checkers that catch bugs before runtime", "typing"),
            ("Threads and Locks", "threads, mutex locks and race conditions in concurrent code", "concurrency"),
        ),
        modifiers=(
            ("Mastering", "with hands-on coding exercises and full source code", "tutorial"),
            ("Practical", "applied to a real-world codebase you can clone and run", "practical"),
            ("Advanced", "for experienced developers who want to go beyond the basics", "advanced"),
            ("A Gentle Introduction to", "for programmers writing their first few hundred lines of code", "intro"),
            ("Common Bugs in", "with a debugger session that tracks down typical mistakes", "debugging"),
            ("Idiomatic", "following the conventions and style guides of senior engineers", "idioms"),
            ("Understanding", "explained from first principles with small code snippets", "concepts"),
            ("Performance Tuning for", "with profiling and benchmarks to make the code run faster", "performance"),
        ),
        templates=(
            "A programming tutorial on {detail}, {mod}.",
            "Learn {detail}, {mod}.",
            "Software engineering lesson covering {detail}, {mod}.",
            "A developer's walkthrough of {detail}, {mod}.",
        ),
        queries=(
            "python generators tutorial",
            "rust borrow checker explained",
            "sql join examples",
            "git rebase vs merge",
            "rest api design best practices",
            "javascript async await",
            "docker containers for developers",
            "debugging race conditions",
        ),
    ),
    "travel": _Vocab(
        title="{mod} {subject}",
        tag="travel",
        subjects=(
            ("Lisbon", "Lisbon's hilly cobbled streets, yellow trams and riverside viewpoints", "portugal"),
            ("Kyoto", "Kyoto's temples, bamboo groves and traditional wooden townhouses", "japan"),
            ("the Scottish Highlands", "the Scottish Highlands with misty lochs, castles and remote glens", "scotland"),
            ("Patagonia", "Patagonia's glaciers, granite peaks and windswept hiking trails", "patagonia"),
            ("Marrakech", "Marrakech's bustling souks, riads and the Atlas Mountains beyond", "morocco"),
            ("Iceland", "Iceland's waterfalls, black sand beaches and geothermal hot springs", "iceland"),
            ("the Amalfi Coast", "the Amalfi Coast's cliffside villages, ferries and pastel harbours", "italy"),
            ("Vietnam", "Vietnam, from Hanoi's old quarter to the limestone karsts of Ha Long Bay", "vietnam"),
            ("New Zealand", "New Zealand's fjords, volcanic lakes and alpine passes", "newzealand"),
            ("the Greek Islands", "the Greek Islands' whitewashed villages, quiet coves and inter-island ferries", "greece"),
            ("Peru's Sacred Valley", "Peru's Sacred Valley, its Inca ruins and the trail to Machu Picchu", "peru"),
            ("Croatia's Dalmatian Coast", "Croatia's Dalmatian coast with walled old towns and turquoise bays", "croatia"),
        ),
        modifiers=(
            ("A Long Weekend in", "with a three-day itinerary of sights, cafes and viewpoints", "weekend"),
            ("Backpacking", "on a backpacker's budget with hostels and overnight buses", "backpacking"),
            ("Hidden Gems of", "away from the tourist crowds, with the spots only locals know", "offbeat"),
            ("A Family Holiday in", "with kid-friendly hotels, beaches and day trips", "family"),
            ("Road Trip Through", "by rental car with scenic drives and roadside stops", "roadtrip"),
            ("Luxury Escape to", "staying in boutique hotels with sea-view suites", "luxury"),
            ("Off-Season Travel in", "in the quiet off-season when flights and rooms are cheaper", "offseason"),
            ("Solo Travel in", "for solo travellers, with safety tips and easy ways to meet people", "solo"),
        ),
        templates=(
            "A travel guide to {detail}, {mod}.",
            "Travel itinerary covering {detail}, {mod}.",
            "Discover {detail}, {mod}.",
            "Pack your bags for {detail}, {mod}.",
        ),
        queries=(
            "weekend in lisbon itinerary",
            "backpacking vietnam on a budget",
            "scottish highlands road trip",
            "hidden gems in kyoto",
            "iceland travel guide",
            "best greek islands to visit",
            "machu picchu trek",
            "solo travel tips",
        ),
    ),
    "fitness": _Vocab(
        title="{mod} {subject}",
        tag="workout",
        subjects=(
            ("Kettlebell Workout", "kettlebell swings, goblet squats and Turkish get-ups for power and grip strength", "kettlebell"),
            ("HIIT Circuit", "a high-intensity interval circuit of burpees, mountain climbers and sprints", "hiit"),
            ("Deadlift Session", "barbell deadlifts with a neutral spine and a strong hip hinge", "deadlift"),
            ("Core Workout", "planks, dead bugs and hollow holds to build a stable core", "core"),
            ("Running Plan", "a progressive running plan that takes you from a 5K to a half marathon", "running"),
            ("Mobility Routine", "hip openers and shoulder stretches that improve mobility and flexibility", "mobility"),
            ("Push-Up Challenge", "push-up progressions that build chest, triceps and shoulder strength", "pushups"),
            ("Leg Day Routine", "back squats, lunges and calf raises for stronger legs and glutes", "legs"),
            ("Rowing Intervals", "rowing machine intervals that build endurance and burn calories", "rowing"),
            ("Resistance Band Workout", "resistance band rows, presses and curls for toning muscles", "bands"),
            ("Pull-Up Program", "a pull-up program that builds back and biceps strength rep by rep", "pullups"),
            ("Jump Rope Cardio", "jump rope cardio rounds that raise your heart rate fast", "cardio"),
        ),
        modifiers=(
            ("20-Minute", "fitting into twenty minutes with a short warm-up and cool-down", "short"),
            ("Beginner-Friendly", "with modifications for anyone just starting their fitness journey", "beginner"),
            ("At-Home", "done in your living room with minimal gear", "athome"),
            ("Fat-Burning", "designed to torch calories and support weight loss", "fatloss"),
            ("Strength-Building", "focused on progressive overload and heavier sets each week", "strength"),
            ("Early-Morning", "timed to wake up your body and start the day with energy", "morning"),
            ("Full-Body", "working every major muscle group in one session", "fullbody"),
            ("Trainer-Led", "led by a personal trainer who counts every rep with you", "personaltrainer"),
        ),
        templates=(
            "A fitness workout of {detail}, {mod}.",
            "Train with {detail}, {mod}.",
            "Get fit with {detail}, {mod}.",
            "Exercise session featuring {detail}, {mod}.",
        ),
        queries=(
            "20 minute hiit workout",
            "kettlebell workout for beginners",
            "how to deadlift safely",
            "core exercises at home",
            "couch to 5k running plan",
            "full body strength training",
            "mobility stretches for hips",
            "pull up progression",
        ),
    ),
}

_SCENE_SUBSETS: tuple[tuple[str, ...], ...] = tuple(
    subset for r in range(1, len(_SCENES) + 1) for subset in itertools.combinations(_SCENES, r)
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _vocab(category: str) -> _Vocab:
    try:
        return _VOCAB[category]
    except KeyError:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}") from None


def build_catalog(n_items: int = 400, seed: int = 7, start_ts: float = 1_700_000_000.0) -> list[dict]:
    """Return ``n_items`` item upsert events, spread round-robin over :data:`CATEGORIES`."""
    if n_items < 0:
        raise ValueError("n_items must be >= 0")
    rng = random.Random(seed)
    # One shuffled (subject, modifier) order per category; wraps with a "Part N" suffix if exhausted.
    orders: dict[str, list[tuple[int, int]]] = {}
    for category in CATEGORIES:
        v = _VOCAB[category]
        combos = list(itertools.product(range(len(v.subjects)), range(len(v.modifiers))))
        rng.shuffle(combos)
        orders[category] = combos

    items: list[dict] = []
    for index in range(n_items):
        category = CATEGORIES[index % len(CATEGORIES)]
        k = index // len(CATEGORIES)
        v = _VOCAB[category]
        combos = orders[category]
        cycle, pos = divmod(k, len(combos))
        s_i, m_i = combos[pos]
        s_title, s_detail, s_tag = v.subjects[s_i]
        m_title, m_phrase, m_tag = v.modifiers[m_i]

        title = _cap(v.title.format(mod=m_title, subject=s_title))
        template = v.templates[rng.randrange(len(v.templates))]
        description = template.format(detail=s_detail, Detail=_cap(s_detail), mod=m_phrase)
        if cycle:
            title = f"{title} (Part {cycle + 1})"
            description = f"{description} Part {cycle + 1} of the series."

        tags = [s_tag, m_tag]
        if rng.random() < 0.5:
            tags.append(v.tag)
        scenes = list(_SCENE_SUBSETS[rng.randrange(len(_SCENE_SUBSETS))])

        items.append(
            {
                "type": "item",
                "item_id": f"demo-{category}-{k:03d}",
                "title": title,
                "description": description,
                "category": category,
                "tags": tags,
                "scenes": scenes,
                "available": True,
                "timestamp": float(start_ts) + index,
            }
        )
    return items


def query_texts(category: str) -> list[str]:
    """Short search phrases a user interested in ``category`` might type."""
    return list(_vocab(category).queries)


@dataclass(frozen=True)
class SimUser:
    """A simulated user with one or two latent categories of interest."""

    user_id: str
    categories: tuple[str, ...]


def simulate_events(
    catalog: list[dict],
    n_users: int = 60,
    events_per_user: int = 12,
    query_share: float = 0.2,
    seed: int = 11,
    scenes=("home", "mobile", "tv"),
) -> tuple[list[dict], list[SimUser]]:
    """Simulate interleaved click/query events for ``n_users`` users; returns (events, users).

    Each user's first event is a click; later events are queries with probability ``query_share``.
    Clicks hit the user's latent categories, except a 10% share of noise clicks on any item.
    """
    if not catalog:
        raise ValueError("catalog is empty")
    if not 0.0 <= query_share <= 1.0 or math.isnan(query_share):
        raise ValueError("query_share must be in [0, 1]")
    scenes = tuple(scenes)
    if not scenes:
        raise ValueError("scenes must be non-empty")

    by_category: dict[str, list[str]] = {}
    for item in catalog:
        by_category.setdefault(item["category"], []).append(item["item_id"])
    present = [c for c in CATEGORIES if c in by_category] + sorted(
        c for c in by_category if c not in _VOCAB
    )
    all_ids = [item["item_id"] for item in catalog]

    rng = random.Random(seed)
    users: list[SimUser] = []
    for u in range(n_users):
        k = 1 if len(present) < 2 or rng.random() < 0.5 else 2
        users.append(SimUser(user_id=f"demo-user-{u:03d}", categories=tuple(rng.sample(present, k))))

    def query_pool(category: str) -> list[str]:
        return query_texts(category) if category in _VOCAB else [category]

    streams: list[list[dict]] = []
    for user in users:
        stream: list[dict] = []
        for e in range(events_per_user):
            scene = rng.choice(scenes)
            category = rng.choice(user.categories)
            if e > 0 and rng.random() < query_share:
                stream.append(
                    {
                        "type": "query",
                        "user_id": user.user_id,
                        "text": rng.choice(query_pool(category)),
                        "scene": scene,
                    }
                )
            else:
                pool = all_ids if rng.random() < _NOISE_CLICK_SHARE else by_category[category]
                stream.append(
                    {
                        "type": "click",
                        "user_id": user.user_id,
                        "item_id": rng.choice(pool),
                        "scene": scene,
                        "weight": 1.0,
                    }
                )
        streams.append(stream)

    # Round-robin with a fresh random user order each round; per-user order is preserved.
    events: list[dict] = []
    for round_index in range(events_per_user):
        order = list(range(len(streams)))
        rng.shuffle(order)
        for u in order:
            event = streams[u][round_index]
            events.append({"type": event["type"], "event_id": f"demo-e-{len(events):06d}", **event})
    return events, users


def chance_rate(catalog: list[dict], users: list[SimUser]) -> float:
    """Mean over users of the share of catalog items in the user's latent categories."""
    if not catalog or not users:
        return 0.0
    counts: dict[str, int] = {}
    for item in catalog:
        counts[item["category"]] = counts.get(item["category"], 0) + 1
    total = len(catalog)
    return sum(sum(counts.get(c, 0) for c in set(u.categories)) / total for u in users) / len(users)
